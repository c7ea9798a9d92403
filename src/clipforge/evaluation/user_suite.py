"""The evaluation suite on the user's own data (:mod:`clipforge.evaluation.datasets` specs).

:func:`run_user_suite` runs the same task functions as :func:`clipforge.evaluation.suite.run_suite`
through a :class:`StreamingContext`: every image set is encoded once, streamed through a
DataLoader (:func:`clipforge.evaluation.loader.encode_refs`), cached under the model's
fingerprint and the dataset's content fingerprint, and subsets (probe halves, the images
that decoded) index into those embeddings. Robustness corrupts the images in the loader's
workers. What each task needs, and the reason recorded when it is skipped:

- ``zero_shot``, ``calibration``, ``robustness``: class labels and class names;
- ``retrieval``, ``diagnostics``: captions;
- ``linear_probe``, ``few_shot``: labels and a train split (``--train-dataset`` or a ``train`` split);
- ``ood``: labels, class names and ``--ood-dataset``;
- ``compositionality``, ``counting``: typed hard negatives and count captions, which only ``shapes`` has.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..metrics import top1
from .cache import DEFAULT_ROOT, EmbeddingCache
from .datasets import EvalData, EvalSplit
from .loader import autocast, decode_for_display, encode_refs
from .suite import CORRUPTIONS, RUNNERS, SEVERITIES, SUITES, Context, SuiteResult
from .suite_data import Labelled, OODSet, RetrievalSet

VIEW = "label"


@dataclass
class RefSeq:
    """A lazy sequence of a split's images (by index); items decode only when a report shows them."""

    split: EvalSplit
    indices: list[int]
    image_size: int
    corruption: tuple[str, int] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Tensor:
        return decode_for_display(self.split.refs[self.indices[i]], self.image_size)


@dataclass
class StreamingContext(Context):
    """A suite context whose image sets are :class:`RefSeq` views of dataset splits."""

    transform: Callable | None = None
    batch_size: int = 64
    workers: int = 2
    precision: str = "fp32"
    device: str = "cpu"
    progress: bool = True
    _memo: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def features(self, split: EvalSplit, corruption: tuple[str, int] | None = None) -> Tensor:
        """Raw [N, d] embeddings of every image of ``split`` (NaN rows: did not decode), cached."""
        key = (f"stream/{split.fingerprint()}/n={len(split)}/transform={self.transform!r}/precision={self.precision}"
               f"/corrupt={corruption}")
        if key not in self._memo:
            desc = f"encode {split.split}" + (f" {corruption[0]}:{corruption[1]}" if corruption else "")
            self._memo[key] = self.cache.get(key, lambda: encode_refs(
                self.model, split.refs, self.transform, self.batch_size, self.workers, self.precision, self.device,
                self.progress, corruption, desc))
        feats = self._memo[key]
        if corruption is None:
            split.mark_failed(torch.nonzero(torch.isnan(feats).any(1)).flatten().tolist())
        return feats

    def images(self, images, spec: str) -> Tensor:
        if isinstance(images, RefSeq):
            return F.normalize(self.features(images.split, images.corruption)[images.indices], dim=-1)
        return super().images(images, spec)

    def texts(self, texts: Sequence[str]) -> Tensor:
        def compute() -> Tensor:
            out = []
            with torch.no_grad():
                for i in range(0, len(texts), 256):
                    ids = self.tokenizer(list(texts[i:i + 256]))
                    ids = ids.to(self.device) if hasattr(ids, "to") else ids
                    with autocast(self.precision, self.device):
                        out.append(self.model.encode_text(ids).float().cpu())
            return torch.cat(out) if out else torch.empty(0, self.model.cfg.embed_dim)

        return F.normalize(self.cache.texts(texts, compute), dim=-1)


def _subset(lab: Labelled, keep: Sequence[int], tag: str) -> Labelled:
    seq: RefSeq = lab.images
    keep = list(keep)
    return Labelled(RefSeq(seq.split, [seq.indices[i] for i in keep], seq.image_size), lab.labels[keep], lab.classnames,
                    lab.templates, f"{lab.spec}/{tag}", [lab.captions[i] for i in keep] if lab.captions else [])


class UserSuiteData:
    """The suite's view of a user dataset (the interface of :mod:`.suite_data`'s classes)."""

    default_view = VIEW
    probe_views = (VIEW,)

    def __init__(self, data: EvalData, ctx: StreamingContext, train: EvalSplit | None = None,
                 ood: EvalData | None = None):
        self.data, self.ctx, self.ood = data, ctx, ood
        self.test, self.train = data.test, train if train is not None else data.train
        self.name = data.spec

    # --------------------------------------------------------------------------- what is missing
    def unsupported(self, task: str) -> str | None:
        t = self.test
        if task == "compositionality":
            return "needs typed hard-negative captions; only the built-in shapes dataset has them"
        if task == "counting":
            return "needs count captions; only the built-in shapes dataset has them"
        if task in ("retrieval", "diagnostics"):
            if t.captions is None:
                return ("no captions: retrieval needs image-caption pairs (a wds retrieval set, or a manifest with "
                        "caption columns)")
            return None
        if t.labels is None:
            return ("no class labels: use an imagefolder, a wds classification set, or a manifest with --label-column "
                    "(this dataset has captions only)")
        if task in ("zero_shot", "calibration", "robustness", "few_shot", "ood") and not t.classnames:
            return "no class names: pass --classnames FILE (one name per line, in class-index order)"
        if task in ("linear_probe", "few_shot"):
            if self.train is None or self.train.labels is None:
                return "no labelled train split: pass --train-dataset SPEC (or use a wds/shards dir with a train split)"
            if len(set(self.train.labels)) < 2:
                return "the train split has fewer than two classes; a probe needs at least two"
            if t.classnames and max(self.train.labels) >= len(t.classnames):
                return (f"the train split uses class index {max(self.train.labels)} but the evaluation split has "
                        f"{len(t.classnames)} classes; give both the same classes")
        if task == "ood" and self.ood is None:
            return "no out-of-distribution set: pass --ood-dataset SPEC"
        if task == "calibration" and len(t) < 4:
            return "calibration needs at least 4 images (a temperature is fitted on half of them)"
        return None

    # --------------------------------------------------------------------------- pieces
    def classification_views(self) -> list[tuple[str, str]]:
        return [(VIEW, VIEW)]

    def _split(self, which: str) -> EvalSplit:
        return self.train if which == "train" else self.test

    def labelled(self, view: str = VIEW, split: str = "test", size: int | None = None) -> Labelled:
        s = self._split(split)
        self.ctx.features(s)  # encodes (or reads the cache) and marks the images that do not decode
        idx = s.good
        return Labelled(
            RefSeq(s, idx, self.ctx.model.image_size),
            torch.tensor([s.labels[i] for i in idx], dtype=torch.long),
            list(self.test.classnames or []),
            list(self.test.templates or []),
            f"{s.name}/{s.split}",
            [s.captions[i] for i in idx] if s.captions else [],
        )

    def probe_splits(self, view: str = VIEW):
        """(train, val, test, None): every fifth train image selects C and the ensembling weight, the
        other four fit; the whole evaluation split tests."""
        tr = self.labelled(view, "train")
        n = len(tr.images)
        val = [i for i in range(n) if i % 5 == 0]
        fit = [i for i in range(n) if i % 5 != 0]
        return _subset(tr, fit, "fit"), _subset(tr, val, "val"), self.labelled(view, "test"), None

    def retrieval(self) -> RetrievalSet:
        s = self.test
        self.ctx.features(s)
        idx = s.good
        captions, owner = [], []
        for j, i in enumerate(idx):
            captions.extend(s.captions[i])
            owner.extend([j] * len(s.captions[i]))
        return RetrievalSet(
            RefSeq(s, idx, self.ctx.model.image_size), captions, torch.tensor(owner), f"{s.name}/{s.split}", s.split
        )

    def ood_set(self) -> OODSet:
        inside = self.labelled(VIEW)
        out = self.ood.test
        self.ctx.features(out)
        return OODSet(
            inside.images,
            RefSeq(out, out.good, self.ctx.model.image_size),
            inside.classnames,
            inside.templates,
            inside.spec,
            f"{out.name}/{out.split}",
            out_name=self.ood.spec,
        )


def task_robustness_stream(ctx: StreamingContext, view: str | None = None):
    """Zero-shot top-1 under each corruption and severity, the corruption applied in the loader's workers
    to the resized and center-cropped image (as the built-in suite corrupts images at the model's size)."""
    view = view or ctx.data.default_view
    lab = ctx.data.labelled(view)
    cls = ctx.classifier(lab.classnames, lab.templates)
    clean = top1(ctx.zero_shot_logits(lab)[1], lab.labels)
    results: dict[str, Any] = {"view": view, "clean": clean, "corruptions": {}}
    seq: RefSeq = lab.images
    for name in CORRUPTIONS:
        row = {}
        for sev in SEVERITIES:
            feats = ctx.images(RefSeq(seq.split, seq.indices, seq.image_size, (name, sev)), "")
            row[str(sev)] = top1(feats @ cls.t(), lab.labels)
        results["corruptions"][name] = row
    mean = [np.mean([results["corruptions"][c][str(s)] for c in CORRUPTIONS]) for s in SEVERITIES]
    results["mean_by_severity"] = {str(s): float(m) for s, m in zip(SEVERITIES, mean)}
    return results, {}


USER_RUNNERS: dict[str, Callable] = {**RUNNERS, "robustness": task_robustness_stream}


def resolve_tasks(suite: str, tasks: Sequence[str] | None) -> tuple[str, ...]:
    if tasks is None:
        if suite not in SUITES:
            raise ValueError(f"unknown suite '{suite}'; choose one of {sorted(SUITES)}")
        return SUITES[suite]
    unknown = [t for t in tasks if t not in USER_RUNNERS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; available: {list(USER_RUNNERS)}")
    return tuple(tasks)


def run_user_suite(model, tokenizer: Callable, data: EvalData, suite: str = "quick", tasks: Sequence[str] | None = None,
                   cache_dir=DEFAULT_ROOT, progress: bool = True, train: EvalSplit | None = None,
                   ood: EvalData | None = None, transform: Callable | None = None, batch_size: int = 64,
                   workers: int = 2, precision: str = "fp32", device: str = "cpu") -> SuiteResult:
    """Run a suite (or ``tasks``) on a user dataset; tasks it cannot run are recorded as skipped, with the reason."""
    tasks = resolve_tasks(suite, tasks)
    model.eval()
    ctx = StreamingContext(
        model,
        tokenizer,
        None,
        EmbeddingCache(model, cache_dir),
        transform=transform,
        batch_size=batch_size,
        workers=workers,
        precision=precision,
        device=device,
        progress=progress,
    )
    ctx.data = UserSuiteData(data, ctx, train, ood)
    results: dict[str, Any] = {"suite": suite, "dataset": data.spec}
    artifacts: dict[str, Any] = {}
    bar = tqdm(tasks, desc=f"eval {suite} {data.spec}", disable=not progress, unit="task")
    for name in bar:
        bar.set_postfix_str(name)
        missing = ctx.data.unsupported(name)
        if missing:
            results[name], artifacts[name] = {"skipped": missing}, {}
            continue
        results[name], artifacts[name] = USER_RUNNERS[name](ctx)
    info = data.summary()
    if ctx.data.train is not None and ctx.data.train is not data.train:
        info["train"] = ctx.data.train.summary()
    if ood is not None:
        info["ood"] = {"spec": ood.spec, **ood.test.summary()}
    results["data"] = info
    results["precision"] = precision
    results["cache"] = {"hits": ctx.cache.hits, "misses": ctx.cache.misses}
    return SuiteResult(results, artifacts)


__all__ = ["RefSeq", "StreamingContext", "UserSuiteData", "resolve_tasks", "run_user_suite", "task_robustness_stream"]
