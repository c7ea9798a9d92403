"""Attribute accuracy of captions on ``shapes``: does a caption name the scene's color, shape and count?

Scored on the scenes with one color-shape pair (kinds ``single`` and ``count``; relation and mixed
scenes have several and are skipped):

- color: the set of color words in the caption is exactly {the scene's color};
- shape: the set of shape words (singular or plural) is exactly {the scene's shape};
- count (``count`` scenes only, 1-4 objects): the caption's number word ("one" .. "four") is the
  number of objects, or, without a number word, the caption names the shape in the singular and
  there is one object.

(benchmarks/bench_coca.py first used a looser rule: any of the scene's colors or shapes named.)
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..data.shapes import COLORS, COUNT_WORDS, PLURALS, SHAPES

_SINGULAR = {s: s for s in SHAPES} | {p: s for s, p in PLURALS.items()}


def _named(caption: str) -> tuple[set[str], set[str], set[int], bool]:
    toks = re.findall(r"[a-z]+", caption.lower())
    colors = {t for t in toks if t in COLORS}
    shapes = {_SINGULAR[t] for t in toks if t in _SINGULAR}
    counts = {COUNT_WORDS.index(t) for t in toks if t in COUNT_WORDS[1:]}
    singular = any(t in SHAPES for t in toks)
    return colors, shapes, counts, singular


def attribute_accuracy(captions: Sequence[str], scenes: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    """Rates of correctly named ``color``, ``shape`` (over single and count scenes) and ``count`` (over
    count scenes); ``scenes[i]`` is a shapes item (``kind``, ``labels``) or a dict with ``kind``,
    ``color``, ``shape``, ``count``. Also returns the numbers of scenes scored (``n_color_shape``, ``n_count``)."""
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes; give one caption per scene")
    color_ok = shape_ok = count_ok = n_obj = n_count = 0
    for caption, scene in zip(captions, scenes):
        if scene["kind"] not in ("single", "count"):
            continue
        color, shape, count = _truth(scene)
        colors, shapes, counts, singular = _named(caption)
        n_obj += 1
        color_ok += colors == {color}
        shape_ok += shapes == {shape}
        if scene["kind"] == "count":
            n_count += 1
            count_ok += counts == {count} if counts else (count == 1 and singular)
    rate = lambda k, n: k / n if n else float("nan")
    return {"color": rate(color_ok, n_obj), "shape": rate(shape_ok, n_obj), "count": rate(count_ok, n_count),
            "n_color_shape": n_obj, "n_count": n_count}


def _truth(scene: dict[str, Any]) -> tuple[str, str, int]:
    if scene.get("labels"):
        lab = scene["labels"]
        return list(COLORS)[lab["color"]], SHAPES[lab["shape"]], lab["count"] + 1
    return scene["color"], scene["shape"], int(scene["count"])
