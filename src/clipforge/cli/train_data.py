"""``clipforge train`` on the user's own data, and the evaluation at the end of a run on a shard set.

The training data layer reads procedural ``shapes``, built corpora and shard sets (``data.dataset=shards
data.root=DIR``). A run given a manifest, an image folder or webdataset shards instead (``data.dataset=csv:pairs.csv``,
the prefixes ``clipforge eval --dataset`` uses) converts it once into a shard set with
:func:`clipforge.data.convert.convert` and trains on that, as OpenCLIP trains from a CSV or from img2dataset shards.
The conversion holds out a small ``val`` split (by a hash of each record's key, so it is stable across runs) for the
evaluation at the end, and stores images at :func:`stored_image_size`; a second run on the same unchanged source
finds the finished conversion and reuses it. Other choices (no held-out split, other fractions, the original pixels)
are ``clipforge data convert``'s flags, followed by ``data.dataset=shards data.root=DIR``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VAL_FRACTION = 0.05  # held out as val for the evaluation at the end of the run
MIN_STORED_SIZE = 256  # px, the shortest side a converted image keeps (more when the model's input is larger)
CHECKPOINT_STORED_SIZE = 384  # init_from: the input size is the checkpoint's (224-384 px for CLIP/SigLIP releases)

OWN_DATA_HELP = """
Your own data (the --dataset prefixes of clipforge eval):
  data.dataset=csv:pairs.csv a manifest (also tsv:, jsonl:, parquet:) with the columns image, caption...
                             and optionally label... (class indices or names)
  data.dataset=imagefolder:DIR
                             images with a .txt caption beside each; subfolders become the label view 'folder'
  data.dataset=wds:DIR       webdataset .tar shards (e.g. img2dataset's output, or DIR/train/*.tar)
Each is converted once into shards under $CLIPFORGE_DATA/converted (or data.root=DIR): 5% held out as val by a
hash of each record, images center-cropped to 256 px (or the model's input size when larger); the run trains on
the rest and evaluates on val at the end. Other choices: clipforge data convert SRC --out DIR [flags], then
data.dataset=shards data.root=DIR.
"""


def source_spec(dataset: str) -> tuple[str, Path] | None:
    """``(prefix, path)`` when ``data.dataset`` names the user's own data (a prefix of ``clipforge eval --dataset``
    other than ``shards:``, which training names ``data.dataset=shards data.root=DIR``), else None."""
    from ..evaluation.datasets import PREFIXES

    prefix, sep, rest = dataset.partition(":")
    if not sep or prefix not in PREFIXES or prefix == "shards":
        return None
    return prefix, Path(rest).expanduser()


def stored_image_size(cfg) -> int:
    """The size converted images are stored at: :data:`MIN_STORED_SIZE`, or the model's input size when larger
    (ViT-L-14-336); the training transform resizes from there. With ``init_from`` the model comes from the
    checkpoint, whose input size is not known before loading it: :data:`CHECKPOINT_STORED_SIZE`."""
    if cfg.init_from:
        return CHECKPOINT_STORED_SIZE
    from ..models import get_model_config

    size = get_model_config(cfg.model).vision.image_size
    size = (cfg.model_overrides.get("vision") or {}).get("image_size", size)
    return max(MIN_STORED_SIZE, int(size))


def _reader_path(prefix: str, path: Path) -> Path:
    """What :func:`clipforge.data.convert.convert` reads for the spec: CLIP_benchmark's webdataset layout
    (``DIR/train/*.tar``) gives its train split."""
    from ..errors import ConfigError

    if not path.exists():
        raise ConfigError(f"data.dataset={prefix}:{path}: {path} does not exist")
    if prefix == "imagefolder" and not path.is_dir():
        raise ConfigError(f"data.dataset=imagefolder:{path}: not a folder")
    if prefix == "wds":
        if not path.is_dir():
            return path  # a single .tar shard
        if not any(path.glob("*.tar")) and any((path / "train").glob("*.tar")):
            return path / "train"
        if not any(path.glob("*.tar")):
            raise ConfigError(f"data.dataset=wds:{path}: no .tar shards in {path} (or in {path}/train)")
    elif prefix != "imagefolder" and path.suffix.lower() != f".{prefix}":
        raise ConfigError(f"data.dataset={prefix}:{path}: expected a .{prefix} file")
    return path


def converted_root(src: Path, image_size: int) -> Path:
    """Where a source is converted by default: one directory per source path, content fingerprint and settings."""
    from ..data.convert import source_fingerprint
    from ..data.shards import data_home

    key = f"{src.resolve()}|{source_fingerprint(src)}|{image_size}|{VAL_FRACTION}"
    return data_home() / "converted" / f"{src.stem or src.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def convert_own_data(cfg, progress: bool = True):
    """``cfg`` unchanged, or, when ``data.dataset`` names the user's own data, ``cfg`` training on its conversion
    (``data.dataset=shards``, ``data.root`` the shard set). Converting is resumable and guarded by a lock, so
    processes started by torchrun convert once and the others wait for it."""
    spec = source_spec(cfg.data.dataset)
    parts = cfg.data.dataset.split("+")
    if len(parts) > 1 and any(source_spec(p) for p in parts) and not (spec and spec[1].exists()):
        from ..errors import ConfigError

        raise ConfigError(f"data.dataset={cfg.data.dataset}: your own data cannot be mixed with '+' here; convert "
                          "it first (clipforge data convert SRC --out DIR) and train on the shard set")
    if spec is None:
        return cfg
    from ..data.convert import convert
    from ..locking import LOCK_NAME, exclusive_lock

    prefix, path = spec
    src = _reader_path(prefix, path)
    size = stored_image_size(cfg)
    out = Path(cfg.data.root).expanduser() if cfg.data.root else converted_root(src, size)
    log.info("data.dataset=%s: converting it into shards at %s (images at %d px, %.0f%% held out as val)",
             cfg.data.dataset, out, size, 100 * VAL_FRACTION)
    fresh = not out.exists()
    try:
        with exclusive_lock(out, what="conversion", timeout=24 * 3600):  # the lock file stays in the shard set
            convert(src, out, image_size=size, val_fraction=VAL_FRACTION, label_from_folder=prefix == "imagefolder",
                    progress=progress)
    except ValueError:  # e.g. no usable record: leave no directory holding only the lock behind
        if fresh and out.is_dir() and [p.name for p in out.iterdir()] == [LOCK_NAME]:
            (out / LOCK_NAME).unlink()
            out.rmdir()
        raise
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset="shards", root=str(out)))


def fit_train_size(cfg):
    """``cfg`` with ``data.train_size`` raised to the shard set's train split when it is a map-style run on a shard
    set larger than the default 20,000 (``data.train_size`` keeps a seeded subset of that many samples: right for
    the procedural ``shapes``, a silent cut of the user's own data); a value set below the split's size is kept,
    with a warning saying how much of the data it leaves out. Streaming runs read every shard anyway."""
    from ..data.shards import read_manifest
    from ..train.config import DataConfig

    if cfg.data.dataset != "shards" or not cfg.data.root or cfg.data.streaming:
        return cfg
    count = int((read_manifest(cfg.data.root)["splits"].get("train") or {}).get("count", 0))
    if count <= cfg.data.train_size:
        return cfg
    if cfg.data.train_size != DataConfig().train_size:
        log.warning("data.train_size=%d trains on a seeded subset of the %d samples of %s's train split; "
                    "data.train_size=%d uses them all", cfg.data.train_size, count, cfg.data.root, count)
        return cfg
    log.info("data.train_size: %d, the train split of %s (the default 20000 would keep a subset)", count,
             cfg.data.root)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_size=count))


def held_out_split(root: str) -> str | None:
    """The split of a shard set that evaluation reads: ``test``, else ``val``; None when it has neither."""
    from ..data.shards import read_manifest

    splits = read_manifest(root)["splits"]
    return next((s for s in ("test", "val") if (splits.get(s) or {}).get("count")), None)


def evaluate_shard_set(model, tokenizer, root: str, size: int) -> dict[str, Any]:
    """Zero-shot (the first label view, when there is one) and retrieval on a shard set's ``test`` split, else its
    ``val`` split, at most ``size`` samples of it (a seeded choice); ``{}`` with a log line when it has neither."""
    import numpy as np

    from ..evaluation.datasets import SpecOptions, load_eval_data
    from ..evaluation.user_suite import run_user_suite

    split = held_out_split(root)
    if split is None:
        log.warning("%s has no test or val split: no evaluation at the end of the run (clipforge eval RUN "
                    "--dataset SPEC evaluates it on other data)", root)
        return {}
    data = load_eval_data(f"shards:{root}", SpecOptions(split=split))
    test = data.test
    if len(test.refs) > size:
        keep = sorted(np.random.default_rng(12345).choice(len(test.refs), size=size, replace=False).tolist())
        for name in ("refs", "keys", "labels", "captions"):
            values = getattr(test, name)
            if values is not None:
                setattr(test, name, [values[i] for i in keep])
    tasks = [t for t, needs in (("zero_shot", test.labels), ("retrieval", test.captions)) if needs is not None]
    if not tasks:
        return {}
    device = str(next(model.parameters()).device)  # where the run trains (the batches follow the model)
    res = run_user_suite(model, tokenizer, data, tasks=tasks, cache_dir=None, progress=False, workers=0,
                         device=device).results
    return {task: res[task] for task in tasks if "skipped" not in res[task]}  # retrieval's key names the split
