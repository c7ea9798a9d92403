"""Streaming image encoding for evaluation: a DataLoader decodes and preprocesses in worker
processes while the model encodes; only one batch of decoded images exists at a time.

:func:`encode_refs` returns one embedding row per image reference; an image that does not
decode gets a row of NaN (the caller drops it and counts it as ``corrupt_image``), so a bad
file never stops a run. ``precision="bf16"`` runs the image tower under bf16 autocast.
Optionally each image is corrupted (:mod:`clipforge.evaluation.robustness`) after it is resized
and center-cropped to the model's size, before the model's transform normalizes it.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..images import ImageLoadError, load_image
from ..transforms import EvalTransform, center_crop, resize_shortest
from .datasets import ImageRef

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16")


class RefImages(Dataset):
    """Map-style dataset over image references: ``(pixels [3, S, S], decoded_ok)`` per item."""

    def __init__(self, refs: Sequence[ImageRef], transform: Callable, image_size: int,
                 corruption: tuple[str, int] | None = None):
        self.refs, self.transform, self.image_size, self.corruption = list(refs), transform, image_size, corruption

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> tuple[Tensor, bool]:
        try:
            img = load_image(self.refs[index].read())
            if self.corruption is not None:
                from .robustness import corrupt

                img = center_crop(resize_shortest(img, self.image_size), self.image_size)
                img = corrupt(img, self.corruption[0], self.corruption[1], seed=index)
            return self.transform(img), True
        except (ImageLoadError, OSError, ValueError, SyntaxError):  # PIL raises SyntaxError on some broken files
            return torch.zeros(3, self.image_size, self.image_size), False


def autocast(precision: str, device: str = "cpu"):
    """bf16 autocast for ``precision="bf16"``, a no-op context for ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}; use fp32 or bf16")
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def encode_refs(model, refs: Sequence[ImageRef], transform: Callable | None = None, batch_size: int = 64,
                workers: int = 2, precision: str = "fp32", device: str = "cpu", progress: bool = True,
                corruption: tuple[str, int] | None = None, desc: str = "encode images") -> Tensor:
    """[N, d] float32 image embeddings (not normalized) of ``refs``; NaN rows for images that do not decode."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    transform = transform or EvalTransform(model.image_size)
    ds = RefImages(refs, transform, model.image_size, corruption)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=max(0, workers),
                        persistent_workers=False, pin_memory=False)
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    bar = tqdm(total=len(ds), desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for pixels, ok in loader:
            with autocast(precision, device):
                feats = model.encode_image(pixels.to(device)).float().cpu()
            feats[~ok] = float("nan")
            out.append(feats)
            bar.update(len(ok))
    finally:
        bar.close()
        model.train(was_training)
    dim = getattr(getattr(model, "cfg", None), "embed_dim", 0)
    return torch.cat(out) if out else torch.empty(0, dim)


def decode_for_display(ref: ImageRef, size: int) -> Tensor | Any:
    """One image as uint8 [3, size, size] (resized and center-cropped) for report grids; gray if it does not decode."""
    import numpy as np

    try:
        img = center_crop(resize_shortest(load_image(ref.read()), size), size)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))
    except (ImageLoadError, OSError, ValueError, SyntaxError):
        return torch.full((3, size, size), 128, dtype=torch.uint8)


__all__ = ["PRECISIONS", "RefImages", "autocast", "decode_for_display", "encode_refs"]
