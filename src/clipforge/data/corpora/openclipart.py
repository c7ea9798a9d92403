"""``openclipart``: the Open Clip Art Library SVGs of Debian's ``openclipart-svg``, rendered with captions.

Source: ``/usr/share/openclipart/svg/CATEGORY[/SUBCATEGORY...]/NAME.svg`` (22 top-level
categories, 8,121 paths of which 663 are symlinks to identical files elsewhere; each real file
is used once). Public domain.

- Image: rendered with ``cairosvg`` on white, cropped to the drawing (pages are often much
  larger than what is drawn on them), centered on a square with a small margin and resized to
  ``image_size``; a file that fails to render, or renders blank, is skipped and counted.
- Captions: the SVG's RDF metadata as written by the artists, kept as they are (stripped of
  surrounding whitespace): ``dc:title``, ``dc:description`` and the ``dc:subject`` keywords
  joined by ", ". Duplicates within a file are dropped; a file with none of them is skipped.
- Label: ``category``, the top-level folder of the real file (class names with ``_`` as spaces).
"""
from __future__ import annotations

import io
import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from .common import build_corpus, require

SOURCE = "/usr/share/openclipart/svg"
PACKAGE = "openclipart-svg"
LICENSE = "public domain (Open Clip Art Library)"
DC = "{http://purl.org/dc/elements/1.1/}"
RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
TEMPLATES = ["a clip art of {}.", "a drawing from the category {}.", "an illustration of {}."]


def svg_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """``{"title", "description", "keywords"}`` from the RDF ``Work`` of an SVG (empty strings/list when absent)."""
    root = ET.parse(path).getroot()
    work = None
    for rdf in root.iter(f"{RDF}RDF"):
        work = next((el for el in rdf if el.tag.endswith("}Work")), None)
        if work is not None:
            break
    if work is None:
        return {"title": "", "description": "", "keywords": []}
    text = lambda el: (el.text or "").strip() if el is not None else ""
    subject = work.find(f"{DC}subject")
    keywords = [text(li) for li in subject.iter(f"{RDF}li")] if subject is not None else []
    if subject is not None and not keywords and text(subject):
        keywords = [text(subject)]
    return {"title": text(work.find(f"{DC}title")), "description": text(work.find(f"{DC}description")),
            "keywords": [k for k in keywords if k]}


def captions_from_metadata(meta: dict[str, Any]) -> list[str]:
    """Title, description and the keyword list, in that order, without empties or repeats."""
    out: list[str] = []
    for c in (meta["title"], meta["description"], ", ".join(meta["keywords"])):
        if c and c not in out:
            out.append(c)
    return out


def content_box(img: Image.Image, threshold: int = 250) -> tuple[int, int, int, int] | None:
    """Bounding box of the pixels that are not (nearly) white, or None for a blank image."""
    dark = Image.eval(img.convert("L"), lambda v: 255 if v < threshold else 0)
    return dark.getbbox()


def render_svg(path: str | os.PathLike, size: int, oversample: int = 4, margin: float = 0.04) -> Image.Image | None:
    """The drawing cropped to its content, centered on a white ``size`` x ``size`` RGB square; None if blank.

    Many SVG pages are far larger than their drawing, so the page is rendered at
    ``oversample * size`` (at most 1024 px on its longer side), cropped to the non-white
    pixels, padded to a square with a ``margin`` and resized with Lanczos (which also
    anti-aliases thin lines).
    """
    import cairosvg

    big = min(size * oversample, 1024)
    png = cairosvg.svg2png(url=str(path), output_width=big, background_color="white")
    img = Image.open(io.BytesIO(png))
    if img.height > big:  # taller than wide: fit the height instead
        png = cairosvg.svg2png(url=str(path), output_height=big, background_color="white")
        img = Image.open(io.BytesIO(png))
    img = img.convert("RGB")
    box = content_box(img)
    if box is None:
        return None
    img = img.crop(box)
    side = int(max(img.size) * (1 + 2 * margin)) + 1
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas.resize((size, size), Image.LANCZOS)


def prepare(payload: dict[str, str], image_size: int) -> dict[str, Any] | str:
    """Metadata, rendering and labels of one SVG, or the reason to skip it."""
    try:
        meta = svg_metadata(payload["path"])
    except (ET.ParseError, UnicodeDecodeError, ValueError):
        return "unparsable_svg"
    captions = captions_from_metadata(meta)
    if not captions:
        return "no_caption"
    try:
        img = render_svg(payload["path"], image_size)
    except Exception:  # cairosvg raises a variety of errors on malformed drawings
        return "render_failed"
    if img is None:
        return "blank_render"
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return {"captions": captions, "labels": {"category": payload["category"]}, "png": buf.getvalue(),
            "extra": {"source": payload["rel"]}}


def candidates(source: str | os.PathLike = SOURCE) -> tuple[list[tuple[str, dict]], list[str], Counter]:
    """(key, payload) per real SVG file, the category names, and counts of what was left out."""
    root = require(source, PACKAGE).resolve()
    left_out: Counter = Counter()
    seen: dict[Path, str] = {}
    for p in sorted(root.rglob("*.svg")):
        real = p.resolve()
        if real in seen or not real.is_file():
            left_out["symlink_to_same_file"] += 1
            continue
        seen[real] = str(p)
    categories = sorted({real.relative_to(root).parts[0] for real in seen if len(real.relative_to(root).parts) > 1})
    out, keys = [], set()
    for real in seen:
        rel = real.relative_to(root)
        if len(rel.parts) < 2:
            left_out["no_category_folder"] += 1
            continue
        key = rel.with_suffix("").as_posix().replace("/", "__").replace(".", "_")
        if key in keys:
            raise RuntimeError(f"two openclipart files map to the key {key}")
        keys.add(key)
        out.append((key, {"path": str(real), "rel": rel.as_posix(), "category": categories.index(rel.parts[0])}))
    return out, categories, left_out


def build(out: str | os.PathLike, image_size: int = 128, limit: int | None = None, workers: int = 2,
          shard_bytes: int = 16 << 20, progress: bool = True, leakage_distance: int = 8,
          source: str | os.PathLike | None = None) -> dict:
    """Build the ``openclipart`` shards into ``out`` from ``source`` (default :data:`SOURCE`); returns the manifest."""
    source = source if source is not None else SOURCE
    cands, categories, left_out = candidates(source)
    views = {"category": {"classes": [c.replace("_", " ") for c in categories], "templates": TEMPLATES}}
    info = {"source": str(source), "debian_package": PACKAGE, "license": LICENSE,
            "left_out_before_rendering": dict(left_out)}
    return build_corpus("openclipart", out, cands, prepare, views, image_size=image_size, limit=limit, workers=workers,
                        shard_bytes=shard_bytes, progress=progress, info=info,
                        leakage_distance=leakage_distance)
