"""Regions of an image: boxes and one caption per box, for region-level methods (CLOC, ComCLIP).

A region set is ``boxes`` (a float array [N, 4] of normalized ``x0, y0, x1, y1``: fractions of the
image width and height, origin at the top left) and ``region_captions`` (N strings, the i-th one
describes box i). ``shapes`` computes them from its scene description (:func:`clipforge.data.shapes.
object_box`); real data carries them in a "region corpus": the shard's ``KEY.json`` has an extra
field ``"regions": {"boxes": [[x0, y0, x1, y1], ...], "captions": [...]}`` that the shard reader
checks and hands on as the item's ``boxes`` and ``region_captions``, and that ``clipforge data
convert`` passes through (with the boxes moved as its center crop moves the pixels).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

REGIONS_FIELD = "regions"  # the extra json field of a region corpus


class RegionError(ValueError):
    """A region set that cannot be used; the message names the problem and the fix."""


def check_regions(boxes: Any, captions: Sequence[str] | None = None, where: str = "sample") -> np.ndarray:
    """``boxes`` as a float64 array [N, 4], after checking that every box lies in the unit square
    (normalized xyxy), is not empty (``x1 > x0`` and ``y1 > y0``) and, when ``captions`` is given,
    that there is exactly one non-empty caption string per box. Raises :class:`RegionError`."""
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise RegionError(f"{where}: boxes must be a list of [x0, y0, x1, y1] numbers ({e})") from None
    if arr.size == 0:
        arr = arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise RegionError(f"{where}: boxes must have shape [N, 4] (normalized x0, y0, x1, y1), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise RegionError(f"{where}: boxes hold NaN or infinite coordinates; give finite normalized coordinates")
    bad = np.flatnonzero(((arr < 0) | (arr > 1)).any(axis=1))
    if bad.size:
        raise RegionError(f"{where}: box {int(bad[0])} {arr[bad[0]].tolist()} lies outside the image; boxes are "
                          "normalized x0, y0, x1, y1 in [0, 1] (divide pixel coordinates by the image width/height)")
    empty = np.flatnonzero((arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1]))
    if empty.size:
        raise RegionError(f"{where}: box {int(empty[0])} {arr[empty[0]].tolist()} is empty; a box needs x1 > x0 and "
                          "y1 > y0 (x0, y0 is the top-left corner)")
    if captions is not None:
        if isinstance(captions, str) or len(captions) != len(arr):
            n = 1 if isinstance(captions, str) else len(captions)
            raise RegionError(f"{where}: {n} region caption(s) for {len(arr)} box(es); "
                              "give exactly one caption per box")
        blank = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
        if blank:
            raise RegionError(f"{where}: region caption {blank[0]} is empty or not a string; give one text per box")
    return arr


def regions_from_json(field: Any, where: str = "sample") -> dict[str, Any]:
    """The item entries (``boxes`` [N, 4] float32 array, ``region_captions``) of a shard's ``regions`` field."""
    if not isinstance(field, dict) or "boxes" not in field or "captions" not in field:
        raise RegionError(f"{where}: the 'regions' field must be an object {{\"boxes\": [[x0, y0, x1, y1], ...], "
                          f"\"captions\": [...]}}, got {type(field).__name__}")
    boxes = check_regions(field["boxes"], field["captions"], where)
    return {"boxes": boxes.astype(np.float32), "region_captions": [str(c) for c in field["captions"]]}


def regions_to_json(boxes: Any, captions: Sequence[str], where: str = "sample") -> dict[str, Any]:
    """The ``regions`` json field of a shard sample, checked."""
    arr = check_regions(boxes, captions, where)
    return {"boxes": [[round(float(v), 6) for v in b] for b in arr], "captions": list(captions)}


def center_crop_regions(field: dict[str, Any], width: int, height: int) -> dict[str, Any] | None:
    """The ``regions`` field after the image (``width`` x ``height``) is resized on its shortest side and
    center-cropped to a square (what ``clipforge data convert --image-size`` does): boxes move and are
    clipped to the crop; a box that falls entirely outside the crop is dropped with its caption. None when
    no box remains."""
    boxes = check_regions(field["boxes"], field["captions"])
    side = min(width, height)
    ox, oy = (width - side) / 2 / side, (height - side) / 2 / side  # the crop's offset, in units of the crop side
    sx, sy = width / side, height / side
    moved = np.stack([boxes[:, 0] * sx - ox, boxes[:, 1] * sy - oy, boxes[:, 2] * sx - ox, boxes[:, 3] * sy - oy], 1)
    moved = moved.clip(0.0, 1.0)
    keep = (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1])
    if not keep.any():
        return None
    return regions_to_json(moved[keep], [c for c, k in zip(field["captions"], keep) if k])


def region_negative_captions(captions: Sequence[str], k: int, rng: np.random.Generator) -> list[list[str]]:
    """Up to ``k`` hard negatives per region caption (FG-CLIP 2's region-level negatives): the caption with
    one attribute changed (``replace_attribute``: "a small red circle." -> "a small blue circle.") or its
    object changed (``replace_object``), distinct and different from the caption itself. Another region's
    attribute may appear (it is wrong for this region). A caption without attribute or object words gets
    none; the training program pads and masks the missing slots."""
    from .negatives import replace_attribute, replace_object
    from .vocabulary import normalize

    out = []
    for caption in captions:
        found, seen = [], {normalize(caption)}
        for attempt in range(4 * k):
            make = replace_attribute if attempt % 2 == 0 else replace_object
            neg = make(caption, rng, ()) or (replace_object if make is replace_attribute else replace_attribute)(
                caption, rng, ())
            if neg is None:
                break
            if normalize(neg) not in seen:
                seen.add(normalize(neg))
                found.append(neg)
                if len(found) == k:
                    break
        out.append(found)
    return out
