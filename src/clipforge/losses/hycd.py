"""Hybrid contrastive-distillation (HyCD) of CLIP-Refine.

Yamaguchi et al., "Post-pre-training for Modality Alignment in Vision-Language Foundation
Models" (CVPR 2025). The CLIP loss's one-hot targets are mixed with the similarity
distribution of a frozen teacher (the pre-trained model itself in CLIP-Refine), so the
model learns the new pairs while keeping what the teacher knew:

    q_i = (1 - alpha) onehot(i) + alpha softmax_j(t_T x^T_i·y^T_j)
    L   = 1/2 [ -1/B sum_i sum_j q_ij log softmax_j(t x_i·y_j)  +  the same for text -> image ]

With alpha = 0 it is exactly the CLIP loss. Several teachers average their softmax
distributions as in :mod:`.distill_kl`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .base import LossInputs
from .distill_kl import teacher_distribution, teacher_targets
from .gather import gather, local_offset
from .registry import register
from .teacher_features import teacher_keys, teacher_pairs, teacher_scales
from .validate import parse_options


def _soft_ce_rows(
    queries: Tensor, candidates: Tensor, logit_scale, teacher: Tensor, alpha: float, offset: int
) -> Tensor:
    """Mean over rows of the cross-entropy with targets (1 - alpha) onehot(offset + i) + alpha teacher_i."""
    logp = (logit_scale * queries @ candidates.t()).log_softmax(-1)
    onehot = torch.zeros_like(logp)
    rows = torch.arange(queries.shape[0], device=queries.device)
    onehot[rows, rows + offset] = 1.0
    return -(((1 - alpha) * onehot + alpha * teacher) * logp).sum(-1).mean()


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the teacher's weight in the hybrid labels) must be in [0, 1], got {alpha}")
    return float(alpha)


def hycd_loss(image_features: Tensor, text_features: Tensor, logit_scale, teacher_image, teacher_text,
              alpha: float = 0.5, teacher_scale: float | Sequence[float] = 100.0) -> Tensor:
    """HyCD: symmetric cross-entropy with hybrid labels (1 - alpha) one-hot + alpha teacher softmax
    (see the module docstring); alpha = 0 is the CLIP loss."""
    alpha = _check_alpha(alpha)
    pairs = teacher_pairs(teacher_image, teacher_text)
    scales = teacher_scales(teacher_scale, len(pairs))
    ti, tt = [a for a, _ in pairs], [b for _, b in pairs]
    rows = _soft_ce_rows(image_features, text_features, logit_scale, teacher_distribution(ti, tt, scales), alpha, 0)
    cols = _soft_ce_rows(text_features, image_features, logit_scale, teacher_distribution(tt, ti, scales), alpha, 0)
    return 0.5 * (rows + cols)


@dataclass
class HycdConfig:
    alpha: float = 0.5  # the teacher's weight in the hybrid labels, in [0, 1]
    teacher_scale: float | Sequence[float] = 100.0  # the teachers' logit scale: one, or one per teacher
    teacher: str = "teacher"  # key prefix of the teacher embeddings: "teacher" (stored) or "ema"

    def __post_init__(self):
        self.alpha = _check_alpha(self.alpha)
        teacher_keys(self.teacher)


@register("hycd")
class HycdLoss(nn.Module):
    """Registered :func:`hycd_loss`, global: local rows against the gathered batch, targets
    offset by this process's position. ``teacher`` picks the stored (``"teacher"``) or EMA
    (``"ema"``) embeddings, as in ``distill_kl``. Options: :class:`HycdConfig`."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(HycdConfig, options, "hycd")
        self.extra_keys = teacher_keys(self.cfg.teacher)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        r, w = inputs.rank, inputs.world_size
        p_rows, p_cols = teacher_targets(inputs, self.extra_keys, self.cfg.teacher_scale)
        x, y = inputs.image_features, inputs.text_features
        offset = local_offset(x.shape[0], r)
        rows = _soft_ce_rows(x, gather(y, r, w), inputs.logit_scale, p_rows, self.cfg.alpha, offset)
        cols = _soft_ce_rows(y, gather(x, r, w), inputs.logit_scale, p_cols, self.cfg.alpha, offset)
        return {"loss": 0.5 * (rows + cols)}
