"""The ``regions`` evaluation: zero-shot region classification and region-text retrieval on ``shapes``.

For every object of ``n`` scenes of a shapes split, its box (:func:`clipforge.data.shapes.object_box`)
is embedded either by the model's region head (``model.encode_regions``, CLOC) or, for a model
without one, by *crop and encode*: the box's pixels cropped (the box grown to at least one patch),
resized bilinearly to the model's input size and passed through ``encode_image`` (the baseline the
CLOC paper compares against). Reported:

- ``shape_top1`` / ``color_top1`` / ``object_top1``: zero-shot classification of each region with the
  shapes label views' prompt-ensembled classifiers (5, 6 and 30 classes);
- ``r2t_R@1``: a region's best-matching text among the distinct region captions of the set is its
  own caption ("a small red circle."); ``t2r_R@1``: a distinct caption's best region is one it describes.

The ``regions`` task of the ``full`` suite (``clipforge eval MODEL --suite full``) runs it on shapes with
crop-and-encode and, when the model has a region head, with the head; ``benchmarks/bench_regions.py``
measures with it for the CLOC fidelity recipe.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.shapes import COLORS, LABEL_VIEWS, SHAPES, ShapesGenerator, region_caption
from ..metrics import top1
from ..transforms import normalize_batch
from .zero_shot import zero_shot_classifier

logger = logging.getLogger(__name__)
METHODS = ("auto", "region_head", "crop")


def crop_boxes(image: Tensor, boxes: np.ndarray, size: int) -> Tensor:
    """uint8 [3, H, W] image -> float pixels [N, 3, size, size] in [0, 255] of each normalized xyxy box,
    grown to at least ``min(H, W) / 8`` pixels per side around its center and resized bilinearly."""
    h, w = image.shape[-2:]
    out = []
    for x0, y0, x1, y1 in boxes:
        side = max(h, w) / 8
        cx, cy = (x0 + x1) / 2 * w, (y0 + y1) / 2 * h
        bw, bh = max((x1 - x0) * w, side), max((y1 - y0) * h, side)
        a, b = int(max(0, np.floor(cx - bw / 2))), int(min(w, np.ceil(cx + bw / 2)))
        c, d = int(max(0, np.floor(cy - bh / 2))), int(min(h, np.ceil(cy + bh / 2)))
        crop = image[:, c:d, a:b].float()[None]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0])
    return torch.stack(out)


@torch.no_grad()
def region_features(model, image: Tensor, boxes: np.ndarray, method: str = "auto") -> tuple[Tensor, str]:
    """(normalized [N, d] embeddings of the boxes of one uint8 image, the method used)."""
    if method not in METHODS:
        raise ValueError(f"region method must be one of {METHODS}, got {method!r}")
    has_head = getattr(model, "region_head", None) is not None
    if method == "region_head" and not has_head:
        raise ValueError("method='region_head' needs a model with a region head (CLOC); use method='crop' or 'auto'")
    if method == "region_head" or (method == "auto" and has_head):
        pixels = normalize_batch(image[None])
        return model.encode_regions(pixels, torch.as_tensor(boxes, dtype=pixels.dtype)[None])[0].float(), "region_head"
    crops = crop_boxes(image, boxes, model.image_size)
    return model.encode_image(normalize_batch(crops.round().clamp(0, 255).to(torch.uint8))).float(), "crop"


@torch.no_grad()
def evaluate_regions(model, tokenizer: Callable, size: int = 200, seed: int = 12345, split: str = "val",
                     method: str = "auto") -> dict:
    """Region classification and region-text retrieval (module docstring) on ``size`` scenes of ``split``."""
    model.eval()
    gen = ShapesGenerator(split, seed=seed, image_size=model.image_size)
    feats, shapes, colors, captions, used = [], [], [], [], None
    for i in range(size):
        s = gen.sample(i)
        image = torch.from_numpy(s.image).permute(2, 0, 1).contiguous()
        f, used = region_features(model, image, s.boxes, method)
        feats.append(f)
        shapes += [SHAPES.index(o.shape) for o in s.objects]
        colors += [list(COLORS).index(o.color) for o in s.objects]
        captions += [region_caption(o) for o in s.objects]
    x = F.normalize(torch.cat(feats), dim=-1)
    shape_y, color_y = torch.tensor(shapes), torch.tensor(colors)
    out = {"method": used, "n_regions": len(x), "n_scenes": size}
    for view, y in (("shape", shape_y), ("color", color_y), ("object", color_y * len(SHAPES) + shape_y)):
        spec = LABEL_VIEWS[view]
        cls = zero_shot_classifier(model, spec["classes"], spec["templates"], tokenizer).float()
        out[f"{view}_top1"] = top1(x @ cls.t(), y)
    distinct = sorted(set(captions))
    own = torch.tensor([distinct.index(c) for c in captions])
    t = F.normalize(model.encode_text(tokenizer(distinct)).float(), dim=-1)
    out["r2t_R@1"] = top1(x @ t.t(), own)
    best = (t @ x.t()).argmax(dim=1)
    out["t2r_R@1"] = float((own[best] == torch.arange(len(distinct))).float().mean())
    return out
