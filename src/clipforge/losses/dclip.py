"""DCLIP's hybrid loss: contrastive learning plus cosine feature distillation.

Csizmadia et al., "Distill CLIP (DCLIP): Enhancing Image-Text Retrieval via Cross-Modal
Transformer Distillation" (2025). A teacher produces enriched image and text embeddings
x^T_i, y^T_i (stored with the data); the student keeps the contrastive objective on its
own pairs and pulls each of its embeddings toward the teacher's embedding of the same
sample, weighted by alpha:

    L_con = CLIP(x, y, t)                                       (symmetric InfoNCE)
    L_cos = 1/2 [ 1/B sum_i (1 - cos(x_i, x^T_i)) + 1/B sum_i (1 - cos(y_i, y^T_i)) ]
    L     = alpha L_con + (1 - alpha) L_cos

Our reading of the paper's "hybrid loss that combines contrastive learning and cosine
similarity objectives": the contrastive part is the student's own CLIP loss, so a config
uses ``dclip`` instead of (not beside) ``clip``. alpha = 1 is the CLIP loss, alpha = 0 pure
feature distillation. Several teachers: the cosine term averages over them. The teacher
embeddings must have the student's dimension (project them once, offline, otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .clip import ClipLoss, clip_loss
from .registry import register
from .teacher_features import teacher_keys, teacher_pairs
from .validate import parse_options


def cosine_distill_loss(image_features: Tensor, text_features: Tensor, teacher_image, teacher_text) -> Tensor:
    """DCLIP's cosine term: 1/2 [mean_i (1 - cos(x_i, x^T_i)) + mean_i (1 - cos(y_i, y^T_i))],
    averaged over teachers; the teacher embeddings are constants."""
    pairs = teacher_pairs(teacher_image, teacher_text)
    d = image_features.shape[-1]
    terms = []
    for k, (ti, tt) in enumerate(pairs):
        if ti.shape[-1] != d:
            raise ValueError(f"cosine distillation needs teacher embeddings of the student's size {d}, teacher {k} "
                             f"has {ti.shape[-1]}; project the stored teacher embeddings to {d} dimensions first")
        cos_i = F.cosine_similarity(image_features, ti.detach(), dim=-1)
        cos_t = F.cosine_similarity(text_features, tt.detach(), dim=-1)
        terms.append(0.5 * ((1 - cos_i).mean() + (1 - cos_t).mean()))
    return torch.stack(terms).mean()


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the contrastive weight) must be in [0, 1], got {alpha}")
    return float(alpha)


def dclip_loss(image_features: Tensor, text_features: Tensor, logit_scale, teacher_image, teacher_text,
               alpha: float = 0.5) -> Tensor:
    """DCLIP: alpha * CLIP(x, y) + (1 - alpha) * cosine distance to the teacher's embeddings."""
    alpha = _check_alpha(alpha)
    return (alpha * clip_loss(image_features, text_features, logit_scale)
            + (1 - alpha) * cosine_distill_loss(image_features, text_features, teacher_image, teacher_text))


@dataclass
class DclipConfig:
    alpha: float = 0.5  # weight of the contrastive part, in [0, 1]
    teacher: str = "teacher"  # key prefix of the teacher embeddings: "teacher" (stored) or "ema"

    def __post_init__(self):
        self.alpha = _check_alpha(self.alpha)
        teacher_keys(self.teacher)


@register("dclip")
class DclipLoss(nn.Module):
    """Registered :func:`dclip_loss`; logs both parts. The contrastive part is global (the
    ``clip`` term over the gathered batch), the cosine part per sample. Options: :class:`DclipConfig`."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(DclipConfig, options, "dclip")
        self.contrastive = ClipLoss()
        self.extra_keys = teacher_keys(self.cfg.teacher)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        con = self.contrastive(inputs)["loss"]
        cos = cosine_distill_loss(inputs.image_features, inputs.text_features,
                                  *(inputs.require(k) for k in self.extra_keys))
        alpha = self.cfg.alpha
        return {"loss": alpha * con + (1 - alpha) * cos, "contrastive": con.detach(), "cosine": cos.detach()}
