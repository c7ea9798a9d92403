"""Read (and write) image-caption data in the usual on-disk formats, skipping and counting bad records.

Every reader yields items in the dataset format of :mod:`clipforge.data.datasets`::

    {"image": uint8 tensor [3, H, W], "captions": [str, ...], "labels": {view: int}, "key": str}

(plus ``"split"`` where the source states one). Several captions per image are supported
everywhere. A record that cannot be used is skipped and counted in a :class:`ReadStats`
under one reason, never raised:

- ``missing_image``: the image path does not exist;
- ``corrupt_image``: the image bytes do not decode (:class:`clipforge.images.ImageLoadError`);
- ``no_caption``: no non-empty caption;
- ``bad_row``: a row that does not parse (broken JSON, wrong column count, a label that is not an int);
- ``bad_shard``: a tar shard that is unreadable or truncated (the rest of the shard is lost);
- ``bad_caption_encoding``: a CSV/TSV caption cell whose bytes are not UTF-8 (never read as replacement
  characters; a non-UTF-8 image path is kept byte for byte).

Formats
- **Manifests** (:func:`iter_manifest`): CSV (``.csv``), TSV (``.tsv``), JSON lines (``.jsonl``)
  and Parquet (``.parquet``). One row per image: an image path column (``image`` by default;
  relative paths are resolved against the manifest's folder), caption columns (by default
  every column whose name starts with ``caption``; a JSONL/Parquet cell may hold a list of
  captions) and optional integer label columns (``label`` -> view ``label``, ``label_X`` ->
  view ``X``).
- **Image folders** (:func:`iter_image_folder`): ``a/b/cat1.jpg`` with a sidecar ``a/b/cat1.txt``
  holding one caption per line; optionally the first folder level is a label view ``folder``.
- **WebDataset shards** (:func:`iter_webdataset`): ``.tar`` files read with the ``webdataset``
  package; a sample is an image (``KEY.jpg``, ``KEY.png``, any key of
  :data:`clipforge.data.image_files.WDS_IMAGE_KEYS`) plus ``KEY.json`` with ``captions`` (list),
  ``label`` (int, or ``{view: int}``), ``labels`` (``{view: int}``) and ``split``; optionally
  ``regions`` (boxes and region captions), caption sources (``caption_sources``, or the fields
  ``rewrites``, ``synthetic``, ``short_tags``, ``negative_descriptions``) and typed ``negatives``,
  which the reader checks (:func:`caption_extras`; a malformed one is a ``bad_row``) and
  ``clipforge data convert`` carries into its shards.

The ``write_*`` functions produce each format from items, so every reader round-trips.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..images import ImageLoadError, load_image
from .image_files import WDS_IMAGE_KEYS, find_images

MANIFEST_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".parquet")
SKIP_REASONS = ("missing_image", "corrupt_image", "no_caption", "bad_row", "bad_shard", "bad_caption_encoding")


@dataclass
class ReadStats:
    """Counts of records read and skipped (by reason), with a few examples of each skip."""

    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(detail)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "skipped": dict(sorted(self.skipped.items())), "examples": self.examples}


def to_uint8_chw(image: Any) -> torch.Tensor:
    """Decode anything :func:`load_image` accepts into a uint8 tensor [3, H, W].

    The HWC -> CHW copy is done in NumPy: a small torch ``.contiguous()`` copy costs about a
    millisecond here through torch's intra-op thread pool, more than the PNG decode.
    """
    return torch.from_numpy(np.ascontiguousarray(np.asarray(load_image(image), dtype=np.uint8).transpose(2, 0, 1)))


def clean_captions(value: Any) -> list[str] | None:
    """Captions from a cell: a string, a list of strings, or empty. ``None`` if the cell is malformed."""
    if value is None:
        return []
    if isinstance(value, float) and value != value:  # NaN from a missing CSV/Parquet cell
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, (list, tuple, np.ndarray)):
        out = []
        for v in value:
            if not isinstance(v, str):
                return None
            if v.strip():
                out.append(v.strip())
        return out
    return None


def as_label(value: Any) -> int | None:
    """A class index from a manifest or ``cls`` value (int, integral float or digit string); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _finish(stats: ReadStats, key: str, image: Any, captions: list[str] | None, labels: dict[str, int],
            extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Decode the image and check the captions of one record; count a skip and return None if unusable."""
    if captions is None:
        stats.skip("bad_row", f"{key}: captions are not strings")
        return None
    if not captions:
        stats.skip("no_caption", key)
        return None
    if isinstance(image, (str, os.PathLike)) and not os.path.exists(image):
        stats.skip("missing_image", f"{key}: {image}")
        return None
    try:
        pixels = to_uint8_chw(image)
    except ImageLoadError as e:
        stats.skip("corrupt_image", f"{key}: {e}")
        return None
    stats.read += 1
    return {"image": pixels, "captions": captions, "labels": labels, "key": key, **(extra or {})}


# ---------------------------------------------------------------- manifests (CSV, TSV, JSONL, Parquet)


_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, escaped by errors="surrogateescape"


def manifest_rows(path: Path, stats: ReadStats) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(row number, row dict) pairs; a row that does not parse comes as None (counted by the caller)."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        # undecodable bytes are kept as surrogate escapes: an image path keeps its exact bytes (os.fsencode),
        # a caption holding them is counted as bad_caption_encoding by the caller instead of read garbled
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
            try:
                header = next(reader, None)
            except csv.Error as e:
                raise ValueError(f"{path}: unreadable header row ({e})") from None
            if header is None:
                return
            n = 0
            while True:
                n += 1
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error:  # e.g. a field over the csv module's size limit
                    yield n, None
                    continue
                if not cells:
                    continue
                yield n, dict(zip(header, cells)) if len(cells) == len(header) else None
    elif suffix == ".jsonl":
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    yield n, None
                    continue
                yield n, row if isinstance(row, dict) else None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for row in batch.to_pylist():
                n += 1
                yield n, row
    else:
        raise ValueError(f"unknown manifest format '{path.suffix}' for {path}; expected one of {MANIFEST_EXTENSIONS}")


def caption_extras(meta: dict[str, Any]) -> dict[str, Any]:
    """The caption sources and typed negatives a sample's JSON stores beside its captions, checked, in the form
    :class:`clipforge.data.shards.ShardDataset` reads back: ``caption_sources`` (a dict, or the top-level fields
    ``rewrites``, ``synthetic``, ``short_tags``, ``negative_descriptions``; see :mod:`clipforge.data.captions`) and
    ``negatives`` (``{type: [caption, ...]}``). Raises TypeError/ValueError naming what is malformed."""
    from .captions import CAPTION_SOURCES, caption_sources

    out: dict[str, Any] = {}
    nested = meta.get("caption_sources")
    if nested is not None and not isinstance(nested, dict):
        raise TypeError(f"caption_sources must be an object {{source: [captions]}}, got {type(nested).__name__}")
    given = {k: meta[k] for k in CAPTION_SOURCES if k != "original" and meta.get(k) is not None}
    given.update(nested or {})
    if given:
        checked = caption_sources({"captions": [], "caption_sources": given})  # unknown names, non-strings: raise
        out["caption_sources"] = {k: checked[k] for k in given}
    negatives = meta.get("negatives")
    if negatives is not None:
        if not isinstance(negatives, dict) or not all(
                isinstance(v, list) and all(isinstance(c, str) for c in v) for v in negatives.values()):
            raise TypeError("negatives must be an object {type: [caption, ...]} of strings")
        out["negatives"] = {str(k): list(v) for k, v in negatives.items()}
    return out


def iter_manifest(path: str | os.PathLike, stats: ReadStats | None = None, image_column: str = "image",
                  caption_columns: Sequence[str] | None = None,
                  label_columns: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Items of a CSV/TSV/JSONL/Parquet manifest (see the module docstring for the columns).

    ``caption_columns``: names of caption columns (default: those starting with ``caption``).
    ``label_columns``: ``{column: view}`` (default: ``label`` -> ``label``, ``label_X`` -> ``X``).
    """
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    base = path.parent
    for n, row in manifest_rows(path, stats):
        key = f"{path.name}:{n}"
        if row is None or not isinstance(row.get(image_column), str) or not row[image_column].strip():
            stats.skip("bad_row", f"{key}: unparsable row or no '{image_column}' value")
            continue
        cols = caption_columns or sorted(c for c in row if c.startswith("caption"))
        undecodable = [c for c in cols if isinstance(row.get(c), str) and _SURROGATE.search(row[c])]
        if undecodable:
            stats.skip("bad_caption_encoding", f"{key}: column '{undecodable[0]}' is not UTF-8 text")
            continue
        captions: list[str] | None = []
        for c in cols:
            got = clean_captions(row.get(c))
            if got is None:
                captions = None
                break
            captions.extend(got)
        lcols = label_columns if label_columns is not None else {
            c: ("label" if c == "label" else c[len("label_"):]) for c in row if c == "label" or c.startswith("label_")}
        labels, bad = {}, None
        for col, view in lcols.items():
            if row.get(col) in (None, ""):
                continue
            value = as_label(row[col])
            if value is None:
                bad = f"{key}: label column '{col}' holds {row[col]!r}, not an integer"
                break
            labels[view] = value
        if bad:
            stats.skip("bad_row", bad)
            continue
        image = Path(row[image_column].strip())
        item = _finish(stats, key, image if image.is_absolute() else base / image, captions, labels)
        if item is not None:
            yield item


def write_manifest(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``rows`` ({"image": path, "captions": [...], "labels": {view: int}}) as CSV/TSV/JSONL/Parquet.

    CSV/TSV get one column per caption (``caption_0``...; rows with fewer captions leave cells
    empty); JSONL and Parquet keep a ``captions`` list. Labels become ``label_VIEW`` columns.
    """
    path = Path(path)
    rows = list(rows)
    flat = []
    for r in rows:
        d: dict[str, Any] = {"image": str(r["image"])}
        d.update({f"label_{v}": int(x) for v, x in (r.get("labels") or {}).items()})
        flat.append((d, list(r["captions"])))
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        width = max((len(c) for _, c in flat), default=1)
        label_cols = sorted({k for d, _ in flat for k in d if k.startswith("label_")})
        header = ["image", *(f"caption_{i}" for i in range(width)), *label_cols]
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t" if suffix == ".tsv" else ",")
            w.writerow(header)
            for d, caps in flat:
                w.writerow([d["image"], *caps, *[""] * (width - len(caps)), *(d.get(c, "") for c in label_cols)])
    elif suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for d, caps in flat:
                f.write(json.dumps({**d, "captions": caps}, ensure_ascii=False) + "\n")
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{**d, "captions": caps} for d, caps in flat]), path)
    else:
        raise ValueError(f"unknown manifest format '{path.suffix}'; expected one of {MANIFEST_EXTENSIONS}")
    return path


# ---------------------------------------------------------------- image folders with sidecar captions


def iter_image_folder(root: str | os.PathLike, stats: ReadStats | None = None,
                      label_from_folder: bool = False) -> Iterator[dict[str, Any]]:
    """Items of a folder tree of images, each captioned by the ``.txt`` file of the same stem.

    With ``label_from_folder`` each item gets ``labels["folder"]``: the index of its first-level
    folder among the sorted first-level folders (``classnames`` of the view ``folder``).
    """
    root = Path(root)
    stats = stats if stats is not None else ReadStats()
    images = find_images(root)
    classes = sorted({p.relative_to(root).parts[0] for p in images if len(p.relative_to(root).parts) > 1})
    for p in images:
        rel = p.relative_to(root)
        key = rel.with_suffix("").as_posix()
        sidecar = p.with_suffix(".txt")
        try:
            lines = sidecar.read_text(encoding="utf-8").splitlines() if sidecar.exists() else []
        except UnicodeDecodeError:
            stats.skip("bad_row", f"{key}: caption file is not UTF-8")
            continue
        labels = {}
        if label_from_folder and len(rel.parts) > 1:
            labels["folder"] = classes.index(rel.parts[0])
        item = _finish(stats, key, p, [ln.strip() for ln in lines if ln.strip()], labels)
        if item is not None:
            yield item


def image_folder_classes(root: str | os.PathLike) -> list[str]:
    """The class names of the ``folder`` label view of :func:`iter_image_folder`."""
    root = Path(root)
    return sorted({p.relative_to(root).parts[0] for p in find_images(root) if len(p.relative_to(root).parts) > 1})


def write_image_folder(root: str | os.PathLike, items: Iterable[dict[str, Any]]) -> Path:
    """Write items ({"key": "sub/name", "image": ..., "captions": [...]}) as PNG + sidecar .txt."""
    root = Path(root)
    for it in items:
        target = root / f"{it['key']}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        load_image(it["image"]).save(target)
        target.with_suffix(".txt").write_text("\n".join(it["captions"]) + "\n", encoding="utf-8")
    return root


# ---------------------------------------------------------------- webdataset .tar shards


def encode_png(image: Any) -> bytes:
    """Lossless PNG bytes of an image (anything :func:`load_image` accepts)."""
    buf = io.BytesIO()
    load_image(image).save(buf, format="PNG")
    return buf.getvalue()


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add ``data`` as a regular file with fixed metadata, so identical input gives identical shards."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def sample_json(captions: Sequence[str], labels: dict[str, int] | None = None, split: str | None = None,
                **extra: Any) -> bytes:
    """The ``KEY.json`` member of a shard sample."""
    labels = dict(labels or {})
    meta: dict[str, Any] = {"captions": list(captions), "labels": labels}
    if labels:
        meta["label"] = next(iter(labels.values()))  # the first view, for tools that read a single label
    if split is not None:
        meta["split"] = split
    meta.update(extra)
    return json.dumps(meta, ensure_ascii=False).encode("utf-8")


def write_webdataset(path: str | os.PathLike, items: Iterable[dict[str, Any]]) -> Path:
    """Write items ({"key", "image", "captions", optional "labels", "split"}) into one .tar shard (PNG images)."""
    path = Path(path)
    with tarfile.open(path, "w") as tar:
        for it in items:
            key = it["key"]
            if "." in key or "/" in key:
                raise ValueError(f"webdataset keys may not contain '.' or '/': {key!r}")
            add_tar_member(tar, f"{key}.png", encode_png(it["image"]))
            add_tar_member(tar, f"{key}.json", sample_json(it["captions"], it.get("labels"), it.get("split")))
    return path


def _shard_urls(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        return [str(s) for s in sorted(p.glob("*.tar"))] if p.is_dir() else [str(p)]
    return [str(s) for s in source]


def decode_labels(meta: dict[str, Any]) -> dict[str, int] | None:
    """A sample's labels from its json: ``labels`` (view -> class index) or a single ``label``
    (an int or a dict); ``{}`` when it has none, None when a label is not a class index."""
    labels = meta.get("labels")
    if labels is None:
        label = meta.get("label")
        if label is None:
            return {}
        labels = label if isinstance(label, dict) else {"label": label}
    if not isinstance(labels, dict):
        return None
    out = {}
    for view, value in labels.items():
        value = as_label(value)
        if value is None:
            return None
        out[str(view)] = value
    return out


def iter_webdataset(source: str | os.PathLike | Sequence[str | os.PathLike], stats: ReadStats | None = None,
                    split: str | None = None) -> Iterator[dict[str, Any]]:
    """Items of webdataset shards (a .tar, a list of them, or a folder of them), read with ``webdataset``.

    ``split`` keeps only samples whose json states that split. A shard that cannot be read to
    its end is counted once as ``bad_shard``; the samples read before the damage are kept. A sample's image is its
    member with a key of :data:`~clipforge.data.image_files.WDS_IMAGE_KEYS`, the first in that order if it has two.
    """
    import webdataset as wds

    stats = stats if stats is not None else ReadStats()
    damaged: set[str] = set()
    for url in _shard_urls(source):
        def on_error(exn: Exception, url=url) -> bool:
            if url not in damaged:  # webdataset reports one tar error at two pipeline stages: count it once
                damaged.add(url)
                stats.skip("bad_shard", f"{url}: {type(exn).__name__}: {exn}")
            return True  # continue with the next shard

        pipeline = wds.WebDataset(url, shardshuffle=False, handler=on_error, empty_check=False)
        for sample in pipeline:
            key = sample.get("__key__", "?")
            raw = sample.get("json")
            try:
                meta = json.loads(raw) if raw is not None else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = None
            if not isinstance(meta, dict):
                stats.skip("bad_row", f"{key}: missing or broken json")
                continue
            if split is not None and meta.get("split") != split:
                continue
            image = next((sample[e] for e in WDS_IMAGE_KEYS if e in sample), None)
            if image is None:
                stats.skip("missing_image", f"{key}: no image member ({'/'.join(WDS_IMAGE_KEYS)})")
                continue
            labels = decode_labels(meta)
            if labels is None:
                stats.skip("bad_row", f"{key}: labels are not integers")
                continue
            extra = {"split": meta["split"]} if "split" in meta else {}
            if meta.get("regions") is not None:  # a region corpus' boxes and region captions, checked on use
                extra["regions"] = meta["regions"]
            try:
                extra.update(caption_extras(meta))
            except (TypeError, ValueError) as e:
                stats.skip("bad_row", f"{key}: {e}")
                continue
            item = _finish(stats, key, image, clean_captions(meta.get("captions")), labels, extra)
            if item is not None:
                yield item


def iter_source(path: str | os.PathLike, stats: ReadStats | None = None, **kwargs) -> Iterator[dict[str, Any]]:
    """Pick the reader from ``path``: a manifest file, a .tar shard, a folder of shards, or an image folder."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() in MANIFEST_EXTENSIONS:
        return iter_manifest(p, stats, **kwargs)
    if (p.is_file() and p.suffix == ".tar") or (p.is_dir() and any(p.glob("*.tar"))):
        return iter_webdataset(p, stats, **kwargs)
    if p.is_dir():
        return iter_image_folder(p, stats, **kwargs)
    raise FileNotFoundError(f"{path}: not a manifest ({', '.join(MANIFEST_EXTENSIONS)}), .tar shard or folder")


__all__ = ["ReadStats", "SKIP_REASONS", "iter_manifest", "write_manifest", "iter_image_folder", "image_folder_classes",
           "write_image_folder", "iter_webdataset", "write_webdataset", "iter_source", "encode_png", "sample_json",
           "add_tar_member", "to_uint8_chw", "clean_captions"]
