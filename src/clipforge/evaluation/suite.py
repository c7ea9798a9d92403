"""Named evaluation suites: run every task of a suite on one model and dataset.

``run_suite(model, tokenizer, "full")`` returns a :class:`SuiteResult`: ``results`` (plain
numbers, written as JSON) and ``artifacts`` (arrays and images the HTML report plots).

Suites (``SUITES``):

- ``quick``: zero-shot classification, retrieval, embedding-space diagnostics;
- ``full``: adds the linear probe, k-shot probes and training-free few-shot adapters (GDA,
  Tip-Adapter, CapS-Adapter), compositionality by negative type, counting, OOD detection,
  calibration with temperature scaling, and robustness to corruptions.

Every encoding goes through an :class:`~clipforge.evaluation.cache.EmbeddingCache`, keyed by
the model's weights and the exact input set, so re-running a suite does not re-encode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from ..metrics import classification_metrics, mcm_score, ood_metrics, top1
from .cache import DEFAULT_ROOT, EmbeddingCache
from .calibration import calibration_report
from .compositionality import count_choice_accuracy, negative_preference
from .diagnostics import embedding_diagnostics
from .features import encode_images, encode_texts
from .few_shot import caps_adapter_logits, caption_support, ensemble, gda_logits, tip_adapter_logits
from .linear_probe import k_shot_indices, linear_probe
from .retrieval import retrieval_metrics
from .robustness import corrupt
from .suite_data import suite_data

TASKS = ("zero_shot", "retrieval", "linear_probe", "few_shot", "compositionality", "counting", "ood", "calibration",
         "robustness", "diagnostics", "regions")
SUITES: dict[str, tuple[str, ...]] = {
    "quick": ("zero_shot", "retrieval", "diagnostics"),
    "full": TASKS,
}
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "jpeg", "contrast", "pixelate")
SEVERITIES = (1, 3, 5)
SHOTS = (1, 2, 4, 8, 16)
ALPHAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


@dataclass
class SuiteResult:
    results: dict[str, Any]
    artifacts: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """The model, its tokenizer, the dataset's suite data and the embedding cache."""

    model: Any
    tokenizer: Callable
    data: Any
    cache: EmbeddingCache

    @property
    def scale(self) -> float:
        """The model's logit scale (the multiplier of cosine similarities), 100 if it has none."""
        scale = getattr(self.model, "scale", None)
        return float(scale().detach()) if callable(scale) else 100.0

    def images(self, images: Sequence | Callable[[], Sequence], spec: str) -> Tensor:
        """Normalized image embeddings; ``images`` may be a function, called only on a cache miss."""
        return F.normalize(
            self.cache.images(spec, lambda: encode_images(self.model, images() if callable(images) else images)), dim=-1
        )

    def texts(self, texts: Sequence[str]) -> Tensor:
        return F.normalize(self.cache.texts(texts, lambda: encode_texts(self.model, texts, self.tokenizer)), dim=-1)

    def classifier(self, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
        """Prompt ensembling: the normalized mean of each class's normalized template embeddings."""
        emb = self.texts([t.format(c) for c in classnames for t in templates])
        return F.normalize(emb.view(len(classnames), len(templates), -1).mean(1), dim=-1)

    def zero_shot_logits(self, labelled) -> tuple[Tensor, Tensor]:
        feats = self.images(labelled.images, labelled.spec)
        return feats, self.scale * feats @ self.classifier(labelled.classnames, labelled.templates).t()


# ---------------------------------------------------------------------------------------- tasks
def task_zero_shot(ctx: Context):
    results, art = {}, {}
    for task, view in ctx.data.classification_views():
        lab = ctx.data.labelled(view)
        _, logits = ctx.zero_shot_logits(lab)
        r = classification_metrics(logits, lab.labels, len(lab.classnames))
        r["classnames"] = lab.classnames
        results[task] = r
        art[task] = {"confusion": np.array(r["confusion_matrix"]), "classnames": lab.classnames}
    return results, art


def task_retrieval(ctx: Context, examples: int = 6, top: int = 5):
    rs = ctx.data.retrieval()
    img, txt = ctx.images(rs.images, rs.spec), ctx.texts(rs.captions)
    results = retrieval_metrics(img, txt, rs.owner)
    queries = np.linspace(0, len(rs.captions) - 1, examples).astype(int).tolist()
    ranked = (txt[queries] @ img.t()).argsort(dim=1, descending=True)[:, :top]
    art = {"examples": [{"caption": rs.captions[q], "truth": int(rs.owner[q]),
                         "images": [(int(j), rs.images[int(j)]) for j in ranked[n]]} for n, q in enumerate(queries)]}
    return {rs.split: results}, art


def task_diagnostics(ctx: Context, points: int = 300):
    rs = ctx.data.retrieval()
    img = ctx.images(rs.images, rs.spec)
    first = [int(torch.nonzero(rs.owner == i)[0]) for i in range(len(rs.images))]
    txt = ctx.texts(rs.captions)[first]  # each image's first caption, so (img[i], txt[i]) is a pair
    results = embedding_diagnostics(img, txt)
    # 2-D projection of both modalities on the principal axes of their union
    n = min(points, len(img))
    joint = torch.cat([img[:n], txt[:n]]).double()
    centered = joint - joint.mean(0)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)
    proj = (centered @ v[:2].t()).numpy()
    return results, {"projection": {"image": proj[:n], "text": proj[n:]}}


def _logistic(train, val, test) -> dict:
    import warnings

    with warnings.catch_warnings():  # k-shot fits have as many classes as samples: sklearn warns, correctly
        warnings.simplefilter("ignore", UserWarning)
        return linear_probe(train[0].numpy(), train[1].numpy(), val[0].numpy(), val[1].numpy(), test[0].numpy(),
                        test[1].numpy())


def task_linear_probe(ctx: Context):
    """C chosen on val; accuracy on the in-distribution test half and on the held-out pairs."""
    results = {}
    for view in ctx.data.probe_views:
        splits = ctx.data.probe_splits(view)
        tr, va, te = ((ctx.images(s.images, s.spec), s.labels) for s in splits[:3])
        r = _logistic(tr, va, te)
        if splits[3] is not None:
            r["top1_heldout_pairs"] = _logistic(
                tr, va, (ctx.images(splits[3].images, splits[3].spec), splits[3].labels)
            )["top1"]
        r["num_classes"] = len(splits[0].classnames)
        results[view] = r
    return results, {}


def _best_alpha(val_zs: Tensor, val_adapter: Tensor, val_y: Tensor) -> float:
    """The ensembling weight with the best validation accuracy (ties: the smaller weight)."""
    accs = [top1(ensemble(val_zs, val_adapter, a), val_y) for a in ALPHAS]
    return ALPHAS[int(np.argmax(accs))]


def task_few_shot(ctx: Context, view: str | None = None):
    """k-shot support sets from ``train``; ensembling weights chosen on ``val``; tested on the
    in-distribution test half (the held-out pairs are the linear probe's second column)."""
    view = view or ctx.data.default_view
    tr, va, te, _ = ctx.data.probe_splits(view)
    ftr, fva, fte = (ctx.images(s.images, s.spec) for s in (tr, va, te))
    classes = len(tr.classnames)
    cls = ctx.classifier(tr.classnames, tr.templates)
    zs_va, zs_te = ctx.scale * fva @ cls.t(), ctx.scale * fte @ cls.t()
    results: dict[str, Any] = {"view": view, "zero_shot": top1(zs_te, te.labels), "shots": {}}
    for k in SHOTS:
        idx = torch.from_numpy(k_shot_indices(tr.labels.numpy(), k, seed=0))
        sup, sup_y = ftr[idx], tr.labels[idx]
        row: dict[str, float] = {}
        methods = {
            "gda": lambda f: gda_logits(f, sup, sup_y, classes),
            "tip_adapter": lambda f: tip_adapter_logits(f, sup, sup_y, classes),
        }
        if tr.captions:  # CapS-Adapter: the support images' captions, not the images, are the cache keys
            cap_texts, cap_y = caption_support(tr.captions, tr.labels, idx.tolist())
            cap_feats = ctx.texts(cap_texts)
            methods["caps_adapter"] = lambda f: caps_adapter_logits(f, cap_feats, cap_y, classes)
        for name, fn in methods.items():
            alpha = _best_alpha(zs_va, fn(fva), va.labels)
            row[name] = top1(ensemble(zs_te, fn(fte), alpha), te.labels)
            row[name + "_alpha"] = alpha
        if len(set(sup_y.tolist())) > 1:
            row["linear"] = _logistic((sup, sup_y), (fva, va.labels), (fte, te.labels))["top1"]
        results["shots"][str(k)] = row
    return results, {}


def task_compositionality(ctx: Context):
    ns = ctx.data.negative_set()
    img = ctx.images(ns.images, ns.spec)
    pos = ctx.texts(ns.positives)
    unique = sorted({c for negs in ns.negatives for caps in negs.values() for c in caps})
    where = {c: i for i, c in enumerate(unique)}
    feats = ctx.texts(unique)
    negatives = [{k: feats[[where[c] for c in caps]] for k, caps in negs.items()} for negs in ns.negatives]
    return negative_preference(img, pos, negatives), {}


def task_counting(ctx: Context):
    cs = ctx.data.count_set()
    img = ctx.images(cs.images, cs.spec)
    k = len(cs.candidates[0])
    txt = ctx.texts([c for cands in cs.candidates for c in cands]).view(len(cs.images), k, -1)
    return count_choice_accuracy(img, txt, cs.true_index), {}


def task_ood(ctx: Context):
    s = ctx.data.ood_set()
    cls = ctx.classifier(s.classnames, s.templates)
    fin, fout = ctx.images(s.in_images, s.in_spec), ctx.images(s.out_images, s.out_spec)
    score_in, score_out = mcm_score(fin, cls), mcm_score(fout, cls)
    results = {"mcm": ood_metrics(score_in.numpy(), score_out.numpy()), "in": s.in_spec, "out": s.out_spec,
               "clipn": "not run: CLIPN needs a model trained with a 'no' text encoder"}
    return results, {"mcm": {"in": score_in.numpy(), "out": score_out.numpy(), "out_name": s.out_name}}


def task_calibration(ctx: Context, view: str | None = None):
    """Zero-shot probabilities on the held-out split; temperature fitted on even, tested on odd samples."""
    view = view or ctx.data.default_view
    lab = ctx.data.labelled(view)
    _, logits = ctx.zero_shot_logits(lab)
    val, test = slice(0, None, 2), slice(1, None, 2)
    r = calibration_report(logits[val], lab.labels[val], logits[test], lab.labels[test])
    art = {"before": r["reliability"], "after": r["reliability_scaled"], "temperature": r["temperature"]}
    return {k: v for k, v in r.items() if not k.startswith("reliability")} | {"view": view, "bins": 15}, art


def _to_pil(image: Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def task_robustness(ctx: Context, view: str | None = None):
    view = view or ctx.data.default_view
    lab = ctx.data.labelled(view)
    cls = ctx.classifier(lab.classnames, lab.templates)
    clean = top1(ctx.zero_shot_logits(lab)[1], lab.labels)
    results: dict[str, Any] = {"view": view, "clean": clean, "corruptions": {}}
    for name in CORRUPTIONS:
        row = {}
        for sev in SEVERITIES:
            spec = f"{lab.spec}/corrupt={name}:{sev}"
            images = lambda: [corrupt(_to_pil(im), name, sev, seed=i) for i, im in enumerate(lab.images)]  # noqa: E731
            row[str(sev)] = top1(ctx.images(images, spec) @ cls.t(), lab.labels)
        results["corruptions"][name] = row
    mean = [np.mean([results["corruptions"][c][str(s)] for c in CORRUPTIONS]) for s in SEVERITIES]
    results["mean_by_severity"] = {str(s): float(m) for s, m in zip(SEVERITIES, mean)}
    return results, {}


def task_regions(ctx: Context):
    """Region classification and region-text retrieval on shapes' val scenes (:mod:`.regions`): crop-and-encode for
    every model, and the region head's embeddings (CLOC's ``encode_regions``) for a model that has one."""
    from .regions import evaluate_regions

    out = {"crop": evaluate_regions(ctx.model, ctx.tokenizer, size=ctx.data.size, seed=ctx.data.seed, method="crop")}
    if getattr(ctx.model, "region_head", None) is not None:
        out["region_head"] = evaluate_regions(ctx.model, ctx.tokenizer, size=ctx.data.size, seed=ctx.data.seed,
                                              method="region_head")
    else:
        out["region_head"] = "not run: the model has no region head (train with the cloc loss term)"
    return out, {}


RUNNERS: dict[str, Callable[[Context], tuple[dict, dict]]] = {
    "zero_shot": task_zero_shot, "retrieval": task_retrieval, "linear_probe": task_linear_probe,
    "few_shot": task_few_shot, "compositionality": task_compositionality, "counting": task_counting,
    "ood": task_ood, "calibration": task_calibration, "robustness": task_robustness, "diagnostics": task_diagnostics,
    "regions": task_regions,
}


def run_suite(model, tokenizer: Callable, suite: str = "quick", dataset: str = "shapes", size: int = 500,
              seed: int = 12345, cache_dir=DEFAULT_ROOT, progress: bool = True,
              tasks: Sequence[str] | None = None, data_root: str | None = None) -> SuiteResult:
    """Run a named suite (or an explicit list of ``tasks``). ``cache_dir=None`` disables the cache."""
    if tasks is None:
        if suite not in SUITES:
            raise ValueError(f"unknown suite '{suite}'; choose one of {sorted(SUITES)}")
        tasks = SUITES[suite]
    unknown = [t for t in tasks if t not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; available: {list(RUNNERS)}")
    model.eval()
    ctx = Context(
        model, tokenizer, suite_data(dataset, model.image_size, size, seed, data_root), EmbeddingCache(model, cache_dir)
    )
    results: dict[str, Any] = {"suite": suite, "dataset": dataset, "size": size, "seed": seed}
    artifacts: dict[str, Any] = {}
    bar = tqdm(tasks, desc=f"eval {suite}", disable=not progress, unit="task")
    for name in bar:
        bar.set_postfix_str(name)
        missing = ctx.data.unsupported(name)
        if missing:  # e.g. no typed hard negatives or count captions in this dataset
            results[name], artifacts[name] = {"skipped": missing}, {}
            continue
        results[name], artifacts[name] = RUNNERS[name](ctx)
    results["cache"] = {"hits": ctx.cache.hits, "misses": ctx.cache.misses}
    return SuiteResult(results, artifacts)
