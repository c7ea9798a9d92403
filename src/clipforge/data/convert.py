"""Convert any source :func:`clipforge.data.formats.iter_source` reads into a shard directory.

    convert("captions.csv", "out/", image_size=128, val_fraction=0.05)

1. **Plan** (one pass over the source, images decoded to find the unusable ones): every usable
   item gets the key ``{n:08d}`` (its rank among the usable items, in source order, so keys are
   valid webdataset keys whatever the source's names) and a split: the one the source states
   (webdataset shards), else ``val``/``test`` by a hash of its source key with the given
   fractions, else ``train``. Skipped records are counted by reason. The plan is saved as
   ``convert-plan.json``, with a fingerprint of the source (sizes and times of its files).
2. **Write**: per split, :class:`clipforge.data.shards.ShardSetWriter` writes the planned keys
   (images resized to ``image_size`` if given, stored as PNG; the source key is kept in the json
   as ``source_key``), then ``stats.json`` and ``manifest.json``. Label views get the class names
   of the source's manifest (a shard directory), of the folders (``label_from_folder``), of the values
   of a manifest's label column when they are names (``label`` = ``cat``, ``dog``: the sorted distinct
   names, as ``clipforge eval --dataset csv:FILE --label-column`` orders them), or ``"0"``,
   ``"1"``, ... . The source is read once more
   per non-empty split. An interrupted conversion rerun with the same arguments reuses the plan
   and the complete shards and writes only the rest.

A source with no usable record is refused before anything is written, with the skip counts and
an example of each reason.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from .formats import (
    MANIFEST_EXTENSIONS,
    ReadStats,
    as_label,
    encode_png,
    image_folder_classes,
    iter_source,
    manifest_rows,
)
from .shards import MANIFEST, SPLITS, ShardSample, ShardSetWriter
from .splits import hash_split

logger = logging.getLogger(__name__)

PLAN = "convert-plan.json"


def source_fingerprint(src: str | os.PathLike) -> str:
    """Sizes and modification times of the source's files: a rerun on a changed source is refused."""
    p = Path(src)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if f != p else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _resized_png(image: Any, image_size: int | None) -> bytes:
    if image_size is None:
        return encode_png(image)
    from ..images import load_image
    from ..transforms import center_crop, resize_shortest

    return encode_png(center_crop(resize_shortest(load_image(image), image_size), image_size))


def _moved_regions(item: dict[str, Any], image_size: int | None) -> dict[str, Any] | None:
    """The item's ``regions`` field (clipforge.data.regions) checked, and moved with the center crop."""
    from .regions import center_crop_regions, regions_from_json, regions_to_json

    checked = regions_from_json(item["regions"], where=f"source item {item['key']}")
    field = regions_to_json(checked["boxes"], checked["region_captions"])
    if image_size is None:
        return field
    height, width = item["image"].shape[-2:]
    return center_crop_regions(field, int(width), int(height))


class _NamedLabels:
    """The label columns of a manifest that hold class names (``cat``, ``dog``) rather than class indices.

    :func:`clipforge.data.formats.iter_manifest` reads integer labels only (what shards store), so such a
    column is left out of its reading (``reader_kwargs``) and put back here, as the index of the name among
    the column's sorted distinct names, once the whole manifest has been seen. A column is named when any
    of its values is not an integer; empty cells give no label, as they do in the reader."""

    def __init__(self, src: Path):
        self.classes: dict[str, list[str]] = {}  # view -> sorted class names
        self.reader_kwargs: dict[str, Any] = {}
        self._by_key: dict[str, dict[str, int]] = {}
        if not (src.is_file() and src.suffix.lower() in MANIFEST_EXTENSIONS):
            return
        columns: dict[str, None] = {}
        values: dict[str, dict[str, str]] = {}  # column -> {item key: name}
        named: set[str] = set()
        for n, row in manifest_rows(src, ReadStats()):
            for col, value in (row or {}).items():
                if col != "label" and not col.startswith("label_"):
                    continue
                columns.setdefault(col)
                if value is None or (isinstance(value, str) and not value.strip()) or (
                        isinstance(value, float) and value != value):  # empty or NaN: no label, as in the reader
                    continue
                values.setdefault(col, {})[f"{src.name}:{n}"] = str(value).strip()  # iter_manifest's key of row n
                if as_label(value) is None:
                    named.add(col)
        if not named:
            return
        view = {c: ("label" if c == "label" else c[len("label_"):]) for c in columns}
        self.reader_kwargs = {"label_columns": {c: view[c] for c in columns if c not in named}}
        for col in sorted(named):
            names = sorted(set(values[col].values()))
            self.classes[view[col]] = names
            index = {name: i for i, name in enumerate(names)}
            for key, name in values[col].items():
                self._by_key.setdefault(key, {})[view[col]] = index[name]

    def items(self, src: Path, stats: ReadStats, reader_kwargs: dict[str, Any]):
        """``iter_source``'s items with the named labels added."""
        for item in iter_source(src, stats, **reader_kwargs, **self.reader_kwargs):
            if self._by_key:
                item["labels"] = {**item["labels"], **self._by_key.get(item["key"], {})}
            yield item


def _plan(src: Path, fractions: dict[str, float], reader_kwargs: dict[str, Any], named: _NamedLabels,
          bar) -> dict[str, Any]:
    stats = ReadStats()
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    max_label: dict[str, int] = {}
    n = 0
    for item in named.items(src, stats, reader_kwargs):
        key = f"{n:08d}"
        n += 1
        stated = item.get("split")
        splits[stated if stated in SPLITS else hash_split(item["key"], fractions)].append(key)
        for view, value in item["labels"].items():
            max_label[view] = max(max_label.get(view, -1), value)
        bar.update(1)
    return {"splits": splits, "read": stats.as_dict(), "max_label": max_label}


def _nothing_usable(src: Path, read: dict[str, Any]) -> ValueError:
    skipped = read.get("skipped") or {}
    examples = "; ".join(f"{reason}: {(read.get('examples', {}).get(reason) or [''])[0]}" for reason in skipped)
    hint = ("check the image paths (relative to the manifest's folder) and the columns: 'image', 'caption...', "
            "'label...'" if src.is_file() else "check that the folder holds images with captions (a .txt beside "
            "each image) or webdataset shards")
    return ValueError(f"{src}: no usable record to convert (skipped: {dict(skipped) or 'none'}"
                      f"{'; e.g. ' + examples if examples else ''}); {hint}")


def convert(src: str | os.PathLike, out: str | os.PathLike, shard_bytes: int = 64 << 20, image_size: int | None = None,
            val_fraction: float = 0.0, test_fraction: float = 0.0, name: str | None = None,
            label_from_folder: bool = False, progress: bool = True) -> dict[str, Any]:
    """Convert ``src`` into shards in ``out`` (see the module docstring); returns the manifest."""
    from tqdm.auto import tqdm

    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not 0.0 <= val_fraction + test_fraction < 1.0 or val_fraction < 0 or test_fraction < 0:
        raise ValueError(f"val and test fractions must be >= 0 with a sum below 1, got {val_fraction}, {test_fraction}")
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    reader_kwargs = {"label_from_folder": True} if label_from_folder else {}
    settings = {"source": str(src.resolve()), "source_fingerprint": source_fingerprint(src), "image_size": image_size,
                "val_fraction": val_fraction, "test_fraction": test_fraction, "label_from_folder": label_from_folder}
    if (out / MANIFEST).exists():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("convert") == settings:
            logger.info("%s: already converted (%d samples); nothing to do", out, manifest["total"])
            return manifest
        raise ValueError(f"{out} already holds a shard set; remove it or choose another --out")
    plan_path = out / PLAN
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else None
    if plan is not None and plan["settings"] != settings:
        raise ValueError(f"{out} holds an unfinished conversion of another source or with other settings "
                         "(or the source changed since); remove it or choose another --out")
    named = _NamedLabels(src)
    if plan is None:
        fractions = {"val": val_fraction, "test": test_fraction}
        with tqdm(desc="convert: scan", unit="rec", disable=not progress, mininterval=1.0) as bar:
            plan = {"settings": settings, **_plan(src, fractions, reader_kwargs, named, bar)}
        if not any(plan["splits"].values()):
            raise _nothing_usable(src, plan["read"])
        out.mkdir(parents=True, exist_ok=True)
        plan_path.write_text(json.dumps(plan))
    else:
        logger.info("%s: resuming the conversion of %s", out, src)

    def produce(wanted: Sequence[str]) -> Iterable[ShardSample | str]:
        todo = iter(wanted)
        nxt = next(todo, None)
        n = 0
        for item in named.items(src, ReadStats(), reader_kwargs):  # the same items in the same order as the plan
            if nxt is None:
                return
            key = f"{n:08d}"
            n += 1
            if key != nxt:
                continue
            extra = {"source_key": item["key"]}
            if item.get("regions") is not None:  # a region corpus: boxes follow the center crop
                extra["regions"] = _moved_regions(item, image_size)
            for field in ("caption_sources", "negatives"):  # LaCLIP/ALIP/HQ-CLIP captions, typed hard negatives
                if item.get(field):
                    extra[field] = item[field]
            yield ShardSample(key, _resized_png(item["image"], image_size), item["captions"], item["labels"],
                              extra=extra)
            nxt = next(todo, None)
        while nxt is not None:  # the source yields fewer items than planned: it changed under us
            yield "vanished_on_resume"
            nxt = next(todo, None)

    writer = ShardSetWriter(out, shard_bytes)
    written = {}
    for split in SPLITS:
        keys = plan["splits"][split]
        if not keys:
            continue
        with tqdm(total=len(keys), desc=f"convert: {split}", unit="img", disable=not progress, mininterval=1.0) as bar:
            written[split] = writer.write_split(split, keys, produce, progress=bar.update)
    classes = image_folder_classes(src) if label_from_folder and src.is_dir() else None
    source_views = json.loads((src / MANIFEST).read_text())["label_views"] if (src / MANIFEST).is_file() else {}
    views = {view: {"classes": classes if view == "folder" and classes else [str(i) for i in range(top + 1)],
                    "templates": ["a photo of {}."]} for view, top in sorted(plan["max_label"].items())}
    views.update({v: spec for v, spec in source_views.items() if v in views})  # a shard directory names its classes
    views.update({v: {"classes": names, "templates": ["a photo of {}."]}  # a manifest's named labels
                  for v, names in named.classes.items() if v in views})
    manifest = writer.finish(name or src.stem, views, skipped=Counter(plan["read"]["skipped"]),
                             info={"image_size": image_size, "convert": settings},
                             extra_stats={"source_read": plan["read"], "convert": {"shards": written}})
    plan_path.unlink()
    return manifest


__all__ = ["convert", "source_fingerprint"]
