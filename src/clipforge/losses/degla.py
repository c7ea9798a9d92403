"""DeGLA's local alignment: image-grounded (IGC) and text-grounded (TGC) contrast.

Hu et al., "Decoupled Global-Local Alignment for Improving Compositional Understanding"
(2025). Each image i comes with K LLM-written hard negative captions n_i1..n_iK
(``extra["negative_text_features"]`` [B, K, d], optional ``negative_text_mask`` [B, K]).
Both losses contrast only within a sample's own candidates, so they sharpen compositional
decisions without pushing the negatives away from every image of the batch:

- IGC, the image as anchor, its caption against its negatives (learned scale t):
      L_IGC = 1/B sum_i -log softmax(t x_i·[y_i, n_i1, .., n_iK])[0]
- TGC, the caption as anchor in text space: the positive is the EMA teacher's embedding
  y^T_i of the same caption (``extra["ema_text_features"]``), the negatives are the sample's
  negative captions, with a fixed scale s (10 in DeGLA's code):
      L_TGC = 1/B sum_i -log softmax(s y_i·[y^T_i, n_i1, .., n_iK])[0]

DeGLA adds them to its global loss (CLIP with the negatives as extra candidates,
``hard_negative`` with ``scope="batch"``) and to the EMA self-distillation (``ema_distill``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .registry import register
from .validate import parse_options


def grounded_contrast(anchor: Tensor, positive: Tensor, negatives: Tensor, logit_scale,
                      mask: Tensor | None = None) -> Tensor:
    """1/B sum_i -log softmax(t a_i·[p_i, n_i1..n_iK])[0]: each anchor must prefer its own
    positive over its own negatives (masked-out negatives drop out of the softmax)."""
    if negatives.ndim != 3 or negatives.shape[0] != anchor.shape[0]:
        raise ValueError(f"negatives must be [B, K, d] with B = {anchor.shape[0]}, got {tuple(negatives.shape)}")
    pos = logit_scale * (anchor * positive).sum(-1, keepdim=True)
    neg = logit_scale * torch.einsum("bd,bkd->bk", anchor, negatives)
    if mask is not None:  # after scaling: a learned scale times -inf would give it a NaN gradient
        neg = neg.masked_fill(~mask.bool(), float("-inf"))
    logits = torch.cat([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device))


@dataclass
class ImageGroundedConfig:
    scale: float | None = None  # None: the model's learned logit scale (as DeGLA); a number fixes it


@dataclass
class TextGroundedConfig:
    scale: float | None = 10.0  # fixed at 10 as in DeGLA; None: the learned logit scale
    positive: str = "ema_text_features"  # extra key of the caption's positive in text space


@register("degla_igc")
class ImageGroundedContrast(nn.Module):
    """IGC (options: :class:`ImageGroundedConfig`)."""

    extra_keys = ("negative_text_features",)

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(ImageGroundedConfig, options, "degla_igc")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        scale = inputs.logit_scale if self.cfg.scale is None else self.cfg.scale
        return {"loss": grounded_contrast(inputs.image_features, inputs.text_features,
                                          inputs.require("negative_text_features"), scale,
                                          inputs.extra.get("negative_text_mask"))}


@register("degla_tgc")
class TextGroundedContrast(nn.Module):
    """TGC; ``positive`` names the extra key of the caption's positive in text space (the EMA
    teacher's embedding by default, or e.g. ``similar_text_features`` for a paraphrase);
    ``scale`` is fixed at 10 as in DeGLA, ``None`` uses the learned logit scale (options:
    :class:`TextGroundedConfig`)."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(TextGroundedConfig, options, "degla_tgc")
        self.extra_keys = ("negative_text_features", self.cfg.positive)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        scale = inputs.logit_scale if self.cfg.scale is None else self.cfg.scale
        return {"loss": grounded_contrast(inputs.text_features, inputs.require(self.cfg.positive),
                                          inputs.require("negative_text_features"), scale,
                                          inputs.extra.get("negative_text_mask"))}
