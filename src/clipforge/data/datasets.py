"""Map-style datasets that the training program and evaluation read, and their registry.

A dataset item is a dict with ``image`` (uint8 tensor [3, H, W] or anything
:func:`clipforge.images.load_image` accepts) and ``captions`` (a list of strings), plus
optional ``labels`` ({view: int}) and ``negatives`` ({type: [captions]}).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from ..registry import Registry
from .shapes import LABEL_VIEWS, ShapesGenerator

DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")


class ShapesDataset(Dataset):
    """``shapes`` as a torch Dataset; images are rendered once and kept in memory as uint8."""

    label_views = LABEL_VIEWS

    def __init__(
        self, split: str = "train", size: int = 10_000, seed: int = 0, image_size: int = 64, cache: bool = True
    ):
        self.generator = ShapesGenerator(split, seed, image_size)
        self.size, self.cache = size, cache
        self._images: torch.Tensor | None = None
        self._meta: list | None = None

    def __len__(self) -> int:
        return self.size

    def _materialize(self) -> None:
        samples = [self.generator.sample(i) for i in range(self.size)]
        self._images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
        self._meta = [(s.captions, s.labels, s.negatives, s.kind) for s in samples]
        self._regions = [(s.boxes, s.region_captions) for s in samples]
        self._scenes = [(s.objects, s.background) for s in samples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0 or index >= self.size:
            raise IndexError(index)
        if self.cache:
            if self._images is None:
                self._materialize()
            captions, labels, negatives, kind = self._meta[index]
            boxes, region_captions = self._regions[index]
            objects, background = self._scenes[index]
            image = self._images[index]
        else:
            s = self.generator.sample(index)
            image = torch.from_numpy(s.image).permute(2, 0, 1).contiguous()
            captions, labels, negatives, kind = s.captions, s.labels, s.negatives, s.kind
            boxes, region_captions = s.boxes, s.region_captions
            objects, background = s.objects, s.background
        # boxes: [N, 4] normalized xyxy of the objects, region_captions: one per box (clipforge.data.regions);
        # objects and background: the scene, which shapes.render draws again (edited: shapes.negative_images)
        return {"image": image, "captions": captions, "labels": labels, "negatives": negatives, "kind": kind,
                "boxes": boxes, "region_captions": region_captions, "objects": list(objects),
                "background": background}


@DATASETS.register("shapes")
def _shapes(split: str = "train", size: int = 10_000, seed: int = 0, image_size: int = 64, **kw) -> ShapesDataset:
    return ShapesDataset(split=split, size=size, seed=seed, image_size=image_size, **kw)


def build_dataset(name: str, **kwargs) -> Dataset:
    """Instantiate a registered dataset by name (``clipforge.data.DATASETS.names()`` lists them).

    ``"a+b"`` concatenates datasets (e.g. ``openclipart+emoji``): each part is built with the
    same arguments (``size`` is then per part) and the items keep their own labels."""
    if "+" in name:
        return ConcatDataset([build_dataset(part.strip(), **kwargs) for part in name.split("+")])
    return DATASETS.get(name)(**kwargs)
