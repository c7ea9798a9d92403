"""Contrast with hard negatives appended to the candidates: negative captions (NegCLIP) and,
for the symmetric form of CLIP-IN, negative images.

Yuksekgonul et al., "When and Why Vision-Language Models Behave like Bags-of-Words" (NegCLIP,
ICLR 2023) append hard negative captions to the text candidates of the image -> text
softmax. CLIP-IN ("Enhancing Fine-Grained Visual Understanding in CLIP via Instruction
Editing Data and Long Captions", 2025) makes it symmetric: edited images are hard negatives
of the original caption in the text -> image softmax as well. With the option
``negative_images=true`` the term requires them and ``clipforge train`` renders them: edited
copies of each ``shapes`` scene (a swapped color, a removed object; train/inputs.py). The
paper edits real photographs with instruction-editing models; the re-rendered scenes are our
stand-in.

Inputs (normalized features): ``extra["negative_text_features"]`` [B, K, d] with optional
``extra["negative_text_mask"]`` [B, K] (True = real; padding rows are dropped from every
softmax), optional ``extra["negative_image_features"]`` [B, K', d] (+ ``negative_image_mask``).

With s(a, b) = t a·b, image i's candidates are all batch texts y_1..y_B plus negatives N_i,
text i's candidates are all batch images plus negative images V_i:

    L = 1/2 [ 1/B sum_i -log softmax(s(x_i, [y_1..y_B, N_i]))[i]
            + 1/B sum_i -log softmax(s(y_i, [x_1..x_B, V_i]))[i] ]

``scope="own"``: N_i holds image i's own negatives (CLIP-IN, DeGLA's IGC spirit).
``scope="batch"``: N_i holds every negative of the (gathered) batch (NegCLIP's and DeGLA's
global loss, where the negative captions join the text batch); likewise for V_i.
Without negatives it is exactly the CLIP loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather, local_offset
from .registry import register
from .validate import parse_options

SCOPES = ("own", "batch")


def _check(negatives: Tensor, mask: Tensor | None, batch: int, what: str) -> None:
    if negatives.ndim != 3 or negatives.shape[0] != batch:
        raise ValueError(f"{what} must be [B, K, d] with B = {batch}, got {tuple(negatives.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(negatives.shape[:2]):
        raise ValueError(f"the mask of {what} must be [B, K] = {tuple(negatives.shape[:2])}, got {tuple(mask.shape)}")


def _direction(queries: Tensor, candidates: Tensor, negatives: Tensor | None, mask: Tensor | None, logit_scale,
               offset: int, scope: str) -> Tensor:
    """Mean over local queries of the cross-entropy over [candidates, negatives], target offset + i."""
    logits = logit_scale * queries @ candidates.t()
    if negatives is not None:
        if scope == "own":
            extra = logit_scale * torch.einsum("bd,bkd->bk", queries, negatives)
            keep = None if mask is None else mask.bool()
        else:
            extra = logit_scale * queries @ negatives.reshape(-1, negatives.shape[-1]).t()
            keep = None if mask is None else mask.bool().reshape(1, -1).expand_as(extra)
        if keep is not None:
            extra = extra.masked_fill(~keep, float("-inf"))
        logits = torch.cat([logits, extra], dim=1)
    targets = torch.arange(queries.shape[0], device=queries.device) + offset
    return F.cross_entropy(logits, targets)


def hard_negative_loss(image_features: Tensor, text_features: Tensor, logit_scale, negative_text: Tensor | None = None,
                       negative_text_mask: Tensor | None = None, negative_image: Tensor | None = None,
                       negative_image_mask: Tensor | None = None, scope: str = "own") -> Tensor:
    """Symmetric InfoNCE with hard negative captions (image -> text) and negative images
    (text -> image) appended to the candidates; see the module docstring for the equation."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    b = image_features.shape[0]
    if negative_text is not None:
        _check(negative_text, negative_text_mask, b, "negative_text_features")
    if negative_image is not None:
        _check(negative_image, negative_image_mask, b, "negative_image_features")
    i2t = _direction(image_features, text_features, negative_text, negative_text_mask, logit_scale, 0, scope)
    t2i = _direction(text_features, image_features, negative_image, negative_image_mask, logit_scale, 0, scope)
    return 0.5 * (i2t + t2i)


@dataclass
class HardNegativeConfig:
    scope: str = "own"  # "own": a sample's own negatives; "batch": every negative of the gathered batch
    # CLIP-IN: read negative images too (extra["negative_image_features"]); the training program then renders
    # data.negative_images edited copies of every image (clipforge.data.shapes.negative_images)
    negative_images: bool = False

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if not isinstance(self.negative_images, bool):
            raise ValueError(f"hard_negative negative_images must be true or false, got {self.negative_images!r}")


@register("hard_negative")
class HardNegativeLoss(nn.Module):
    """Registered :func:`hard_negative_loss`, global: local queries against the gathered batch
    (and, with ``scope="batch"``, the gathered negatives). Options: :class:`HardNegativeConfig`."""

    extra_keys = ("negative_text_features",)

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(HardNegativeConfig, options, "hard_negative")
        if self.cfg.negative_images:
            self.extra_keys = ("negative_text_features", "negative_image_features")

    def _negatives(self, inputs: LossInputs, key: str, required: bool):
        negs = inputs.require(key) if required else inputs.extra.get(key)
        if negs is None:
            return None, None
        mask = inputs.extra.get(key.replace("_features", "_mask"))
        _check(negs, mask, inputs.image_features.shape[0], key)
        if self.cfg.scope == "batch" and inputs.world_size > 1:
            r, w = inputs.rank, inputs.world_size
            mask = None if mask is None else gather(mask.to(negs.dtype), r, w).bool()
            negs = gather(negs, r, w)
        return negs, mask

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        r, w = inputs.rank, inputs.world_size
        x, y = inputs.image_features, inputs.text_features
        offset = local_offset(x.shape[0], r)
        nt, nt_mask = self._negatives(inputs, "negative_text_features", required=True)
        ni, ni_mask = self._negatives(inputs, "negative_image_features", required=self.cfg.negative_images)
        i2t = _direction(x, gather(y, r, w), nt, nt_mask, inputs.logit_scale, offset, self.cfg.scope)
        t2i = _direction(y, gather(x, r, w), ni, ni_mask, inputs.logit_scale, offset, self.cfg.scope)
        return {"loss": 0.5 * (i2t + t2i)}
