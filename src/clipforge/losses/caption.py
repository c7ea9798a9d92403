"""Captioning cross-entropy for a caption decoder (CoCa, Yu et al., "CoCa: Contrastive
Captioners are Image-Text Foundation Models", 2022).

The decoder predicts token l+1 from the image and tokens <= l. With logits
``extra["caption_logits"]`` [B, L, V] and targets ``extra["caption_targets"]`` [B, L]
(already shifted; ``pad_id`` positions ignored):

    L_cap = 1/|valid| sum_{(b, l) valid} [ -(1 - eps) log p_bl[target_bl] - eps/V sum_v log p_bl[v] ]

with p_bl = softmax(logits_bl) and label smoothing eps (0: the plain negative log-likelihood
of the next token). CoCa trains ``{clip: 1.0, caption: 2.0}``. The mean runs over this
process's tokens: under data parallelism it equals the global token mean when processes
hold equal numbers of non-pad tokens (as OpenCLIP's CoCa loss does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .registry import register
from .validate import parse_options


def caption_loss(logits: Tensor, targets: Tensor, pad_id: int = 0, label_smoothing: float = 0.0) -> Tensor:
    """Mean token cross-entropy of decoder ``logits`` [B, L, V] against ``targets`` [B, L], pad ignored."""
    if logits.ndim != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(f"caption logits must be [B, L, V] and targets [B, L]; got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)} (targets are the input tokens shifted by one)")
    if targets.dtype.is_floating_point:
        raise ValueError(f"caption targets must be integer token ids, got {targets.dtype}")
    if not (targets != pad_id).any():
        raise ValueError(f"every caption target is the pad id {pad_id}: no token to predict; check pad_id and the "
                         "target shift")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax over a large vocabulary needs fp32
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=pad_id,
                           label_smoothing=label_smoothing)


@dataclass
class CaptionConfig:
    pad_id: int = 0  # target id ignored by the loss
    label_smoothing: float = 0.0  # eps


@register("caption")
class CaptionLoss(nn.Module):
    """Registered :func:`caption_loss` (options: :class:`CaptionConfig`) on the decoder's
    ``caption_logits`` and ``caption_targets``."""

    extra_keys = ("caption_logits", "caption_targets")

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(CaptionConfig, options, "caption")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        return {"loss": caption_loss(inputs.require("caption_logits"), inputs.require("caption_targets"),
                                     self.cfg.pad_id, self.cfg.label_smoothing)}
