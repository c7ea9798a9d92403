"""``shapes_long``: the shapes scenes with one synthetic long caption each, for Long-CLIP experiments.

The long caption is several sentences: the scene's first (short) caption as a summary, a fixed
description of the drawing style, one sentence per object with its size and where it lies,
and the background's color last. With the style sentence in the middle, the per-object places
and the background usually start past CLIP's 77 tokens, which is the situation Long-CLIP
(Zhang et al., 2024) addresses: a text tower that truncates at 77 never sees them. The long
caption is appended to the item's captions (``captions[-1]``, also ``item["long_caption"]``), so
``captions[0]`` stays the caption that hard negatives are written from; its first sentence is the
short caption (:func:`clipforge.data.long_captions.short_and_long`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .datasets import DATASETS, ShapesDataset
from .shapes import ShapeObject

STYLE = ("This is a synthetic picture drawn with flat colors: every object is a plain filled polygon or circle "
         "without any texture, outline, shading or shadow, and nothing else such as text, frames, borders or noise "
         "appears anywhere in the image.")


def _where(obj: ShapeObject) -> str:
    col = "left" if obj.x < 1 / 3 else "right" if obj.x > 2 / 3 else "center"
    row = "top" if obj.y < 1 / 3 else "bottom" if obj.y > 2 / 3 else "middle"
    if (row, col) == ("middle", "center"):
        return "in the center of the picture"
    return f"in the {row} {col} part of the picture" if col != "center" else f"in the {row} center of the picture"


def background_name(rgb: tuple[int, int, int]) -> str:
    """A word for the (dark) background color: the dominant channel's hue, or gray."""
    r, g, b = (int(v) for v in rgb)
    if max(r, g, b) - min(r, g, b) < 15:
        hue = "gray"
    else:
        hue = {0: "reddish", 1: "greenish", 2: "bluish"}[max(range(3), key=lambda i: (r, g, b)[i])]
    return f"{'very dark' if (r + g + b) / 3 < 25 else 'dark'} {hue}"


def long_caption(summary: str, objects: list[ShapeObject], background: tuple[int, int, int]) -> str:
    """Summary sentence, drawing style, one sentence per object (size, color, shape, place), background."""
    ordinals = ("first", "second", "third", "fourth", "fifth")
    parts = [summary.strip().rstrip(".") + ".", STYLE]
    for k, obj in enumerate(objects):
        parts.append(f"The {ordinals[k] if len(objects) > 1 else 'only'} object is a {obj.size} {obj.color} "
                     f"{obj.shape} {_where(obj)}.")
    parts.append(f"The background is {background_name(background)}.")
    return " ".join(parts)


class ShapesLongDataset(ShapesDataset):
    """:class:`ShapesDataset` whose items also carry ``long_caption`` (appended to ``captions``)."""

    def _materialize(self) -> None:
        samples = [self.generator.sample(i) for i in range(self.size)]
        self._images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
        self._meta = [(s.captions, s.labels, s.negatives, s.kind) for s in samples]
        self._regions = [(s.boxes, s.region_captions) for s in samples]
        self._scenes = [(s.objects, s.background) for s in samples]
        self._long = [long_caption(s.captions[0], s.objects, tuple(s.image[0, 0])) for s in samples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        if self.cache:
            long = self._long[index]
        else:
            s = self.generator.sample(index)
            long = long_caption(s.captions[0], s.objects, tuple(s.image[0, 0]))
        return {**item, "captions": [*item["captions"], long], "long_caption": long}


@DATASETS.register("shapes_long")
def _shapes_long(
    split: str = "train", size: int = 10_000, seed: int = 0, image_size: int = 64, **kw
) -> ShapesLongDataset:
    return ShapesLongDataset(split=split, size=size, seed=seed, image_size=image_size, **kw)
