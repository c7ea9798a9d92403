"""Similarity-distribution distillation from an ensemble of teachers (MobileCLIP).

Vasu et al., "MobileCLIP: Fast Image-Text Models through Multi-Modal Reinforced Training"
(CVPR 2024). Teacher embeddings are precomputed and stored with the data, so distillation
costs the student no teacher forward pass (layouts: :mod:`.teacher_features`).

With student logits s_ij = t x_i·y_j and, for teacher k of T with its own scale t_k,
teacher logits s^k_ij = t_k x^k_i·y^k_j, the target of image i is the teachers' mean
distribution over the batch's texts

    p_i = 1/T sum_k softmax_j(s^k_ij)          (averaged after the softmax, as MobileCLIP does)

and the loss is the KL divergence from it to the student's distribution, in both directions
(image -> texts on the rows, text -> images on the columns), averaged over the batch:

    L = 1/2 [ 1/B sum_i KL(p_i || softmax_j s_ij) + 1/B sum_j KL(p^T_j || softmax_i s_ij) ]

The KL differs from MobileCLIP's cross-entropy with the soft targets only by the targets'
entropy, a constant for the student: same gradients, and zero when the student matches.
MobileCLIP's full objective mixes it with the CLIP loss, ``{clip: 1 - lam, distill_kl: lam}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather
from .registry import register
from .teacher_features import gather_teachers, teacher_keys, teacher_pairs, teacher_scales
from .validate import parse_options


def teacher_distribution(queries: Sequence[Tensor], candidates: Sequence[Tensor], scales: Sequence[float]) -> Tensor:
    """p_ij = mean over teachers k of softmax_j(t_k q^k_i·c^k_j), from constant (detached) teacher embeddings."""
    probs = [(s * q.detach() @ c.detach().t()).softmax(-1) for q, c, s in zip(queries, candidates, scales)]
    return torch.stack(probs).mean(0)


def _kl_rows(queries: Tensor, candidates: Tensor, logit_scale, target: Tensor) -> Tensor:
    """1/rows sum_i KL(target_i || softmax_j(t q_i·c_j))."""
    return F.kl_div((logit_scale * queries @ candidates.t()).log_softmax(-1), target, reduction="batchmean")


def distill_kl_loss(image_features: Tensor, text_features: Tensor, logit_scale, teacher_image, teacher_text,
                    teacher_scale: float | Sequence[float] = 100.0) -> Tensor:
    """MobileCLIP's ensemble distillation: symmetric KL from the teachers' mean similarity
    distribution to the student's (see the module docstring for the equation).

    ``teacher_image``/``teacher_text``: [B, d], [T, B, d] or a list of [B, d_k];
    ``teacher_scale``: one logit scale for all teachers or one per teacher."""
    pairs = teacher_pairs(teacher_image, teacher_text)
    scales = teacher_scales(teacher_scale, len(pairs))
    ti, tt = [a for a, _ in pairs], [b for _, b in pairs]
    rows = _kl_rows(image_features, text_features, logit_scale, teacher_distribution(ti, tt, scales))
    cols = _kl_rows(text_features, image_features, logit_scale, teacher_distribution(tt, ti, scales))
    return 0.5 * (rows + cols)


def teacher_targets(inputs: LossInputs, keys: Sequence[str], teacher_scale) -> tuple[Tensor, Tensor]:
    """The teachers' averaged distributions for this process's rows over the gathered batch:
    image->text (``p_rows``) and text->image (``p_cols``)."""
    pairs = teacher_pairs(*(inputs.require(k) for k in keys))
    scales = teacher_scales(teacher_scale, len(pairs))
    everyone = gather_teachers(pairs, inputs.rank, inputs.world_size)
    p_rows = teacher_distribution([a for a, _ in pairs], [b for _, b in everyone], scales)
    p_cols = teacher_distribution([b for _, b in pairs], [a for a, _ in everyone], scales)
    return p_rows, p_cols


@dataclass
class DistillKLConfig:
    teacher_scale: float | Sequence[float] = 100.0  # the teachers' logit scale: one, or one per teacher
    teacher: str = "teacher"  # key prefix of the teacher embeddings: "teacher" (stored) or "ema"

    def __post_init__(self):
        teacher_keys(self.teacher)


@register("distill_kl")
class DistillKLLoss(nn.Module):
    """Registered :func:`distill_kl_loss`, global: each process's rows (its images, its texts)
    are scored against the gathered batch, for the student and for every teacher.

    ``teacher="teacher"`` reads the stored ``teacher_*_features``; ``teacher="ema"`` reads
    ``ema_*_features``, the embeddings of the training program's EMA copy of the model. Options:
    :class:`DistillKLConfig`."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(DistillKLConfig, options, "distill_kl")
        self.extra_keys = teacher_keys(self.cfg.teacher)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        r, w = inputs.rank, inputs.world_size
        p_rows, p_cols = teacher_targets(inputs, self.extra_keys, self.cfg.teacher_scale)
        x, y = inputs.image_features, inputs.text_features
        rows = _kl_rows(x, gather(y, r, w), inputs.logit_scale, p_rows)
        cols = _kl_rows(y, gather(x, r, w), inputs.logit_scale, p_cols)
        return {"loss": 0.5 * (rows + cols)}
