"""Embedding a collection of images (``clipforge embed --images|--dataset``) in one process.

A :class:`Collection` is an ordered list of items, each a key (the output's ``item`` column: the
path as given for ``--images``, the dataset's own key for ``--dataset``) and an
:class:`~clipforge.evaluation.datasets.ImageRef` saying where its bytes are (a file or a byte range
of a tar). :func:`embed_local` encodes it in order in this process; the Ray engine
(:mod:`clipforge.serve.ray_embed`) encodes the same collection with an actor pool and returns the
same rows in the same order. Both decode an image with :func:`read_pixels` and write with
:func:`write_embeddings`, so the two engines differ only in where the model runs.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.image_files import IMAGE_SUFFIXES, find_images
from ..errors import ConfigError, MissingInputError
from ..evaluation.datasets import ImageRef, SpecOptions, is_builtin, load_eval_data
from ..images import ImageLoadError, load_image

log = logging.getLogger(__name__)

SKIP_BAD_HINT = "pass --skip-bad to skip unreadable images"


@dataclass(frozen=True)
class Collection:
    """The images to embed, in output order: ``keys[i]`` names ``refs[i]``."""

    keys: list[str]
    refs: list[ImageRef]

    def __post_init__(self):
        if len(self.keys) != len(self.refs):
            raise ValueError(f"a collection needs one key per image reference ({len(self.keys)} keys, "
                             f"{len(self.refs)} references)")

    def __len__(self) -> int:
        return len(self.refs)

    def fingerprint(self) -> str:
        """SHA-256 over every item's key, byte range and its file's size and modification time: a renamed,
        added, removed, reordered or rewritten image changes it (the Ray engine's resume check)."""
        h = hashlib.sha256()
        stats: dict[str, str] = {}
        for key, ref in zip(self.keys, self.refs):
            if ref.path not in stats:
                try:
                    st = os.stat(ref.path)
                    stats[ref.path] = f"{st.st_size}:{st.st_mtime_ns}"
                except OSError:
                    stats[ref.path] = "missing"
            h.update(f"{key}\0{ref.path}\0{ref.offset}\0{ref.size}\0{stats[ref.path]}\n".encode())
        return h.hexdigest()


def image_paths(paths: Sequence[str]) -> list[Path]:
    """The given image files, and the images under the given folders (recursively, sorted), each once (by its
    path with the given folder, or a given file's folder, resolved, first mention kept: ``a.png folder/`` with a.png
    in folder/ gives it once; a symlink inside a folder stays an image of its own, as `clipforge index` keeps it).
    A path that does not exist is refused before anything is loaded."""
    files: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise MissingInputError(f"--images: '{p}' does not exist; give image files or folders that hold images")
        found = find_images(p) if p.is_dir() else [p]
        root = p.resolve() if p.is_dir() else p.parent.resolve()
        for f in found:
            real = root / (f.relative_to(p) if p.is_dir() else p.name)
            if real not in seen:
                seen.add(real)
                files.append(f)
    return files


def collect_images(paths: Sequence[str]) -> Collection:
    """The images of :func:`image_paths`, keyed by path."""
    files = image_paths(paths)
    if not files:
        raise MissingInputError(f"no images found in {' '.join(map(str, paths))} (looked for "
                                f"{', '.join(sorted(IMAGE_SUFFIXES))}); give a folder that holds images, or "
                                "image files")
    return Collection([str(f) for f in files], [ImageRef(str(f)) for f in files])


def collect_dataset(spec: str, split: str = "test", image_column: str = "image") -> Collection:
    """The images of a ``clipforge eval`` dataset spec (``imagefolder:``, ``wds:``, ``csv:``, ``tsv:``,
    ``jsonl:``, ``parquet:``, ``shards:``), in the reader's order, keyed by the reader's keys; records the
    reader skips (missing or zero-byte images, unusable rows) are left out and logged."""
    if is_builtin(spec):
        raise ConfigError(f"--dataset {spec}: embed reads your own data as PREFIX:PATH (imagefolder:DIR, wds:DIR, "
                          f"csv:FILE, jsonl:FILE, parquet:FILE, shards:DIR); for the built-in {spec} corpus give its "
                          f"shard directory, shards:DIR (`clipforge data build {spec}` prints it)")
    data = load_eval_data(spec, SpecOptions(split=split, image_column=image_column))
    part = data.test
    if part.stats.skipped:
        log.warning("--dataset %s: skipped %s", spec, ", ".join(f"{n} {why}" for why, n in part.stats.skipped.items()))
    if not part.refs:
        raise MissingInputError(f"--dataset {spec} has no images to embed")
    return Collection(list(part.keys), list(part.refs))


def prepare_model(model, dtype: str = "fp32", source: str = "the model", frozen: bool = False):
    """``model`` ready to embed with ``dtype`` weights and compute: a clipforge CLIP goes through
    ``CLIP.to_inference`` (frozen, cast once, the fused CPU layers of :mod:`clipforge.models.fused_inference`;
    embeddings still returned as float32); another model (a uCLIP pivot) is used as it is in fp32. ``frozen``: the
    caller needs ``to_inference``'s frozen weights (a compiled encoder), so other models are refused."""
    if not hasattr(model, "to_inference"):
        if dtype == "fp32" and not frozen:
            return model
        what = f"--dtype {dtype}" if dtype != "fp32" else "--compile"
        raise ConfigError(f"{what} needs a clipforge CLIP model; '{source}' loads as a "
                          f"{type(model).__name__}: leave out {what}")
    model.to_inference(dtype)
    return model


def read_pixels(ref: ImageRef, key: str, transform: Callable):
    """The model's input tensor for one image; :class:`ImageLoadError` naming ``key`` when it cannot be read."""
    try:
        return transform(load_image(ref.read()))
    except ImageLoadError as e:
        if ref.offset < 0:
            raise
        raise ImageLoadError(key, str(e)) from None
    except OSError as e:  # a tar or file that vanished after it was listed
        raise ImageLoadError(key, str(e)) from None


@dataclass
class EmbedResult:
    """Embeddings of the readable images, in collection order, and the keys of the images skipped as unreadable.

    ``blocks_computed``/``blocks_reused``: the Ray engine's output blocks encoded by this run and found
    complete from an earlier one (both 0 for the single-process engine). ``timings``: the Ray engine's
    wall-clock seconds from starting the pipeline until the first actor had loaded its model
    (``startup``) and from then until the last result was back (``streaming``), and the ``images``
    sent through Ray (empty when nothing was computed)."""

    keys: list[str]
    embeddings: np.ndarray
    bad: list[str] = field(default_factory=list)
    blocks_computed: int = 0
    blocks_reused: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def embed_local(model, transform: Callable, collection: Collection, batch_size: int = 128, device: str = "cpu",
                skip_bad: bool = False, progress: bool = True) -> EmbedResult:
    """Encode ``collection`` in order with ``model.encode_image`` in batches of ``batch_size`` (float32 rows).

    An unreadable image stops the run with its name and the ``--skip-bad`` hint, or with ``skip_bad`` is left
    out and listed in :attr:`EmbedResult.bad`."""
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    keys: list[str] = []
    bad: list[str] = []
    chunks = []
    for i in tqdm(range(0, len(collection), batch_size), desc="embed images", unit="batch", disable=not progress):
        pixels = []
        for key, ref in zip(collection.keys[i : i + batch_size], collection.refs[i : i + batch_size]):
            try:
                pixels.append(read_pixels(ref, key, transform))
                keys.append(key)
            except ImageLoadError as e:
                if not skip_bad:
                    raise ValueError(f"{e} ({SKIP_BAD_HINT})") from None
                bad.append(key)
        if pixels:
            with torch.no_grad():
                chunks.append(model.encode_image(torch.stack(pixels).to(device)).float().cpu())
    emb = torch.cat(chunks).numpy() if chunks else np.zeros((0, model.cfg.embed_dim), np.float32)
    return EmbedResult(keys, emb.astype(np.float32, copy=False), bad)


def output_path(out: str | Path) -> Path:
    """``out`` as a path, checked to end in ``.npy`` or ``.parquet`` (before anything is embedded)."""
    out = Path(out)
    if out.suffix not in (".npy", ".parquet"):
        raise ConfigError(f"--out must end in .npy or .parquet, got '{out.name}'")
    return out


def write_embeddings(out: str | Path, keys: Sequence[str], embeddings: np.ndarray) -> Path:
    """``.npy``: the [N, d] float32 array; ``.parquet``: columns ``item`` (the keys) and ``embedding``
    (float32 lists)."""
    out = output_path(out)
    emb = np.asarray(embeddings, dtype=np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, emb)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"item": list(keys), "embedding": pa.array(list(emb), type=pa.list_(pa.float32()))})
        pq.write_table(table, out)
    return out


__all__ = ["Collection", "EmbedResult", "collect_dataset", "collect_images", "embed_local",
           "output_path", "prepare_model", "read_pixels", "write_embeddings"]
