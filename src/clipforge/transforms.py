"""Image preprocessing for CLIP, on Pillow, NumPy and torch (no torchvision).

- :class:`EvalTransform`: resize the shortest side to ``image_size`` (bicubic), center crop,
  scale to [0, 1], normalize with the OpenAI CLIP mean/std. It matches Hugging Face's
  ``CLIPImageProcessor`` (same resize rule, same crop offsets) to within 1e-3.
- :class:`TrainTransform`: random resized crop, optional horizontal flip and color jitter.
  Every random draw comes from an explicit ``torch.Generator``, so a sample's augmentation
  is a pure function of the seed the data pipeline hands it (exact resume, any worker count).
  The draws are an :class:`Augmentation` (``draw``) that ``replay`` applies again to the same
  pixels (MobileCLIP's reinforced data stores them).

Both accept whatever :func:`clipforge.images.load_image` accepts and return a float32
tensor ``[3, image_size, image_size]``. :func:`normalize_batch` normalizes an already
sized uint8 batch in one vectorized step (the fast path for datasets rendered at the
model's resolution).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .images import load_image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_float_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> float32 [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> Tensor:
    """(x - mean) / std over the channel axis (-3) of a float tensor in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x - m) / s


def normalize_batch(images: Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> Tensor:
    """uint8 [N, 3, H, W] -> normalized float32 [N, 3, H, W]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_batch expects uint8 images, got {images.dtype}")
    return normalize(images.float().div_(255.0), mean, std)


def resize_shortest(img: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """Resize so the shorter side is ``size``; the longer side is ``int(size * long / short)``."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), resample=resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size`` x ``size`` square (offsets rounded down; padded with black if smaller)."""
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


@dataclass
class EvalTransform:
    image_size: int
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD

    def __call__(self, image: Any, generator: torch.Generator | None = None) -> Tensor:
        img = center_crop(resize_shortest(load_image(image), self.image_size), self.image_size)
        return normalize(to_float_tensor(img), self.mean, self.std)


def _uniform(g: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            g: torch.Generator | None) -> tuple[int, int, int, int]:
    """A box (left, top, right, bottom) covering a random area fraction in ``scale`` with an
    aspect ratio in ``ratio`` (log-uniform); after 10 failed draws, the largest central box
    whose ratio fits. The sampling rule of Inception-style random resized crops."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def jitter_factors(brightness: float, contrast: float, saturation: float,
                   g: torch.Generator | None) -> tuple[float | None, float | None, float | None]:
    """The brightness, contrast and saturation factors of :func:`color_jitter`, each uniform in [1 - s, 1 + s]
    and drawn in that order, None where its strength s is 0 (no draw)."""
    return tuple(_uniform(g, max(0.0, 1 - s), 1 + s) if s > 0 else None for s in (brightness, contrast, saturation))


def apply_jitter(x: Tensor, factors: tuple[float | None, float | None, float | None]) -> Tensor:
    """Brightness, contrast and saturation factors (None: skipped) applied in that order to [3, H, W] in [0, 1]."""
    gray_w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(3, 1, 1)
    b, c, s = factors
    if b is not None:
        x = (x * b).clamp_(0, 1)
    if c is not None:
        mean = (x * gray_w).sum(0).mean()
        x = (c * x + (1 - c) * mean).clamp_(0, 1)
    if s is not None:
        gray = (x * gray_w).sum(0, keepdim=True)
        x = (s * x + (1 - s) * gray).clamp_(0, 1)
    return x


def color_jitter(x: Tensor, brightness: float, contrast: float, saturation: float, g: torch.Generator | None) -> Tensor:
    """Random brightness, contrast and saturation factors in [1 - s, 1 + s], applied in that order to
    [3, H, W] images in [0, 1]."""
    return apply_jitter(x, jitter_factors(brightness, contrast, saturation, g))


@dataclass(frozen=True)
class Augmentation:
    """One draw of :class:`TrainTransform`: the crop box (left, top, right, bottom) in source pixels, the flip,
    and the jitter factors (None: not drawn). :meth:`TrainTransform.replay` applies it again."""

    box: tuple[int, int, int, int]
    flip: bool
    jitter: tuple[float | None, float | None, float | None]


@dataclass
class TrainTransform:
    image_size: int
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False
    jitter: float = 0.0
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD

    def __call__(self, image: Any, generator: torch.Generator | None = None) -> Tensor:
        img = load_image(image)
        return self.replay(img, self.draw(img.width, img.height, generator))

    def draw(self, width: int, height: int, generator: torch.Generator | None = None) -> Augmentation:
        """The random part of the transform for a ``width`` x ``height`` image: crop box, then flip, then jitter."""
        box = random_resized_crop_box(width, height, self.scale, self.ratio, generator)
        flip = bool(self.hflip and float(torch.rand((), generator=generator)) < 0.5)
        return Augmentation(box, flip, jitter_factors(self.jitter, self.jitter, self.jitter, generator))

    def replay(self, image: Any, aug: Augmentation) -> Tensor:
        """The transform with its random draws given (``__call__`` is ``replay(image, draw(...))``)."""
        img = load_image(image)
        img = img.resize((self.image_size, self.image_size), resample=Image.BICUBIC, box=tuple(aug.box))
        if aug.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return normalize(apply_jitter(to_float_tensor(img), aug.jitter), self.mean, self.std)


def image_transform(image_size: int, is_train: bool = False, **options) -> EvalTransform | TrainTransform:
    """The preprocessing for a model of resolution ``image_size``.

    ``is_train=False``: resize, center crop, normalize. ``is_train=True``: random resized crop
    plus the ``options`` of :class:`TrainTransform` (``scale``, ``ratio``, ``hflip``, ``jitter``).
    Note that flips are off by default: captions here state left/right relations.
    """
    if is_train:
        return TrainTransform(image_size, **options)
    if options:
        raise TypeError(f"eval transform takes no augmentation options, got {sorted(options)}")
    return EvalTransform(image_size)
