"""``clipforge data export-wds SRC --out DIR``: write any dataset ``clipforge eval`` reads in
CLIP_benchmark's webdataset layout, so the same data evaluates in both tools::

    DIR/<split>/0.tar ... (N-1).tar     samples s0000000.png (or .jpg/.webp) + .cls (class index) or .txt (captions)
    DIR/<split>/nshards.txt             N
    DIR/classnames.txt                  classification: one name per class index
    DIR/zeroshot_classification_templates.txt   classification: one template per line, {c} for the class
    DIR/dataset_type.txt                "retrieval" for caption datasets

SRC is a spec (``imagefolder:DIR``, ``csv:FILE``, ``shards:DIR``, ...) or a plain path: a
folder with ``manifest.json`` is a shard directory (every split is exported), another folder an
image folder, a ``.csv``/``.tsv``/``.jsonl``/``.parquet`` file a manifest. PNG, JPEG and WebP
bytes are copied unchanged (so evaluation reads the same pixels from the source and the
export); other formats are re-encoded as PNG. Every image is decoded once to check it; one
that does not decode is skipped and counted. Tar members carry fixed metadata, so the same
input writes identical shards. (It lives with the evaluation readers it uses; the data core
does not import :mod:`clipforge.evaluation`.)
"""
from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from ..data.formats import MANIFEST_EXTENSIONS, ReadStats, add_tar_member, encode_png
from .datasets import PREFIXES, EvalSplit, SpecOptions, load_eval_data

log = logging.getLogger(__name__)
KEEP_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


def source_spec(src: str) -> str:
    """The ``--dataset`` spec of an export source given as a spec or a plain path."""
    kind, sep, _ = src.partition(":")
    if sep and kind in PREFIXES:
        return src
    p = Path(src)
    if not p.exists():
        raise FileNotFoundError(
            f"{src} does not exist; give an image folder, a manifest ({', '.join(MANIFEST_EXTENSIONS)}) "
            "or a shard directory"
        )
    if p.is_dir():
        return f"shards:{src}" if (p / "manifest.json").is_file() else f"imagefolder:{src}"
    if p.suffix.lower() in MANIFEST_EXTENSIONS:
        return f"{p.suffix.lower().lstrip('.')}:{src}"
    raise ValueError(f"{src}: not an image folder, shard directory or manifest ({', '.join(MANIFEST_EXTENSIONS)}); "
                     "name the reader explicitly, e.g. csv:FILE")


def _image_member(raw: bytes | str) -> tuple[bytes, str]:
    """(bytes, extension) to store: the original bytes for PNG/JPEG/WebP, PNG otherwise; raises on undecodable data."""
    data = Path(raw).read_bytes() if isinstance(raw, str) else raw
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
        im.load()
        if fmt in KEEP_FORMATS:
            return data, KEEP_FORMATS[fmt]
        return encode_png(im.convert("RGB")), "png"


def _write_split(
    split: EvalSplit, out: Path, name: str, retrieval: bool, max_count: int, progress: bool
) -> dict[str, Any]:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.tar"):
        old.unlink()
    stats = ReadStats()
    n, shard, tar = 0, 0, None
    try:
        for i in tqdm(range(len(split)), desc=f"export {name}", unit="img", disable=not progress, leave=False):
            try:
                data, ext = _image_member(split.refs[i].read())
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                stats.skip("corrupt_image", f"{split.keys[i]}: {type(e).__name__}: {e}")
                continue
            if tar is None or n % max_count == 0 and n:
                if tar is not None:
                    tar.close()
                    shard += 1
                tar = tarfile.open(folder / f"{shard}.tar", "w")  # noqa: SIM115 - one per shard, closed below
            key = f"s{n:07d}"
            add_tar_member(tar, f"{key}.{ext}", data)
            if retrieval:
                text = "\n".join(c.replace("\n", " ") for c in split.captions[i])
                add_tar_member(tar, f"{key}.txt", text.encode("utf-8"))
            else:
                add_tar_member(tar, f"{key}.cls", str(int(split.labels[i])).encode())
            n += 1
            stats.read += 1
    finally:
        if tar is not None:
            tar.close()
    nshards = shard + 1 if n else 0
    (folder / "nshards.txt").write_text(f"{nshards}\n")
    skipped = dict(split.stats.skipped) | {k: v + split.stats.skipped.get(k, 0) for k, v in stats.skipped.items()}
    return {"samples": n, "shards": nshards, "skipped": dict(sorted(skipped.items())),
            "examples": {**split.stats.examples, **stats.examples}}


def export_wds(src: str, out: str | Path, split: str = "test", label_column: str | None = None,
               classnames: str | None = None, templates: str = "openai_imagenet", max_count: int = 10_000,
               progress: bool = True) -> dict[str, Any]:
    """Write ``src`` to ``out`` in CLIP_benchmark's layout; returns per-split sample, shard and skip counts.

    A source with class labels becomes a classification set (``cls``), one with captions only a
    retrieval set (``txt``). ``split`` names the evaluation split in ``out`` (and selects the
    split of a shard directory); a train split the source has is written as ``train``."""
    if max_count < 1:
        raise ValueError(f"--max-count must be at least 1, got {max_count}")
    spec = source_spec(str(src))
    data = load_eval_data(spec, SpecOptions(split=split, templates=templates, classnames=classnames,
                                            label_column=label_column))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    retrieval = data.test.labels is None
    report: dict[str, Any] = {"source": spec, "type": "retrieval" if retrieval else "classification", "splits": {}}
    if retrieval:
        (out / "dataset_type.txt").write_text("retrieval\n")
    else:
        if data.test.classnames:
            (out / "classnames.txt").write_text("\n".join(data.test.classnames) + "\n", encoding="utf-8")
        if data.test.templates:
            lines = [t.replace("{}", "{c}") for t in data.test.templates]
            (out / "zeroshot_classification_templates.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    splits = [(split, data.test)] + ([("train", replace(data.train))] if data.train is not None else [])
    for name, s in splits:
        report["splits"][name] = _write_split(s, out, name, retrieval, max_count, progress)
    return report


__all__ = ["export_wds", "source_spec"]
