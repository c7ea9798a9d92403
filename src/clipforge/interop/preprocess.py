"""Image preprocessing of loaded models, read from ``preprocessor_config.json`` when present.

CLIP-style processors resize the shorter side and center-crop (clipforge's
:class:`~clipforge.transforms.EvalTransform`); SigLIP's resize straight to a square without
cropping (:class:`SquashTransform`). Mean and std come from the processor config, else the
family default (OpenAI's statistics for CLIP, 0.5/0.5 for SigLIP).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..images import load_image
from ..transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, EvalTransform, normalize, to_float_tensor

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass
class SquashTransform:
    """Resize to image_size x image_size (bicubic, aspect ratio not kept), scale to [0, 1], normalize."""

    image_size: int
    mean: tuple = SIGLIP_MEAN
    std: tuple = SIGLIP_STD

    def __call__(self, image: Any, generator: torch.Generator | None = None) -> Tensor:
        img = load_image(image).resize((self.image_size, self.image_size), resample=Image.BICUBIC)
        return normalize(to_float_tensor(img), self.mean, self.std)


def preprocess_for(directory: str | Path | None, family: str, image_size: int):
    cfg = {}
    if directory is not None and (Path(directory) / "preprocessor_config.json").exists():
        cfg = json.loads((Path(directory) / "preprocessor_config.json").read_text())
    siglip = family == "siglip"
    mean = tuple(cfg.get("image_mean", SIGLIP_MEAN if siglip else OPENAI_CLIP_MEAN))
    std = tuple(cfg.get("image_std", SIGLIP_STD if siglip else OPENAI_CLIP_STD))
    crop = cfg.get("do_center_crop", not siglip)
    return EvalTransform(image_size, mean, std) if crop else SquashTransform(image_size, mean, std)
