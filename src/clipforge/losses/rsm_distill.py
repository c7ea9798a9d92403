"""RS-M-CLIP's local/global self-distillation: a student on a local crop matches an EMA teacher on the global view.

Silva et al., "Multilingual Vision-Language Pre-training for the Remote Sensing Domain" (RS-M-CLIP,
2024) fine-tunes CLIP with the contrastive objective plus a self-distillation term that aligns local
and global representations of each image, in the manner of DINO (Caron et al., 2021, eq. 1 and
the multi-crop loss of its Sec. 3.1) and SILC: the student sees small local crops, the teacher, an
exponential moving average of the student, sees the global view, and the student's distribution
must match the teacher's sharper one. With s_i the model's embedding of a local crop of image i
(``extra["image_features_view2"]``, with gradients), t_i the EMA teacher's embedding of the global
image (``extra["ema_image_features"]``, no gradient), tau_s and tau_t the two temperatures:

    P_t(i) = softmax(t_i / tau_t),   log P_s(i) = log_softmax(s_i / tau_s)          (over the d dims)
    L = 1/B sum_i H(P_t(i), P_s(i)) = -1/B sum_i sum_k P_t(i)_k log P_s(i)_k

The EMA copy is the training program's (``ema_momentum``); the local crop is the training
program's second view (``data.view_scale``: a small-area random resized crop, e.g. [0.05, 0.4],
resized to the model's input size because the image tower's position embeddings are fixed).

Simplifications, stated: one local crop and one global view per image (DINO and RS-M-CLIP use
several of each, with all cross pairs); no DINO projection head: the distributions are over the
model's own normalized embedding dimensions; and no teacher centering: the contrastive term
trained with it keeps the embeddings from collapsing, and without a batch statistic the term is
per sample, so local to each process under distribution (no gathering).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import LossInputs
from .registry import register
from .validate import check_pairs, parse_options


def rsm_distill_loss(student_local: Tensor, teacher_global: Tensor, student_temperature: float = 0.1,
                     teacher_temperature: float = 0.04) -> Tensor:
    """The module docstring's L: cross-entropy of the student's local-crop distribution against the
    teacher's sharper global-view distribution, mean over the batch; the teacher gets no gradient."""
    check_pairs(student_local, teacher_global, "rsm_distill", names=("image_features_view2", "ema_image_features"))
    target = torch.softmax(teacher_global.detach() / teacher_temperature, dim=-1)
    return -(target * torch.log_softmax(student_local / student_temperature, dim=-1)).sum(-1).mean()


@dataclass
class RsmDistillConfig:
    student_temperature: float = 0.1  # DINO's tau_s
    teacher_temperature: float = 0.04  # DINO's tau_t (its warm-up from 0.04 to 0.07 is not modelled)

    def __post_init__(self):
        if self.student_temperature <= 0 or self.teacher_temperature <= 0:
            raise ValueError(f"rsm_distill temperatures must be positive, got student {self.student_temperature} "
                             f"and teacher {self.teacher_temperature}")


@register("rsm_distill")
class RsmDistillLoss(nn.Module):
    """Registered :func:`rsm_distill_loss` (options: :class:`RsmDistillConfig`); reads the second view as
    the local crop and the EMA teacher's image embeddings as the global view."""

    extra_keys = ("image_features_view2", "ema_image_features")

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(RsmDistillConfig, options, "rsm_distill")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        loss = rsm_distill_loss(inputs.require("image_features_view2"), inputs.require("ema_image_features"),
                                self.cfg.student_temperature, self.cfg.teacher_temperature)
        return {"loss": loss}
