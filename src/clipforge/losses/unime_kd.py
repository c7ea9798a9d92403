"""UniME's textual discriminative knowledge distillation (Gu et al., 2025, "Breaking the Modality Barrier:
Universal Embedding Learning with Multimodal LLMs", stage 1, the KL loss of Sec. 3.1).

The student is the LVLM's language model embedding a text (last hidden state of a summarizing prompt,
:mod:`clipforge.models.lvlm`); the teacher is an LLM-based text embedder (here: a causal LM's mean-pooled states,
e.g. the caption embedder ``clipforge lm-finetune`` writes). With L2-normalized student embeddings s_i and
teacher embeddings t_i of the batch's texts and the temperature tau, each text's similarity distribution over the
batch is

    P^T_i = softmax_j(t_i . t_j / tau),     P^S_i = softmax_j(s_i . s_j / tau)

and the loss is the mean KL divergence from the teacher's distribution to the student's:

    L_KD = 1/B sum_i KL(P^T_i || P^S_i)

Inputs: ``text_features`` (the student) and ``extra["teacher_text_features"]`` [B, d_T] (any width; constant).
Global: each process's rows are scored against the gathered batch (student and teacher alike).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather
from .registry import register
from .validate import parse_options


def unime_kd_loss(student: Tensor, teacher: Tensor, temperature: float = 0.05, student_all: Tensor | None = None,
                  teacher_all: Tensor | None = None) -> Tensor:
    """1/B sum_i KL(softmax_j(t_i.t_j / tau) || softmax_j(s_i.s_j / tau)) for normalized [B, d] rows; the columns
    j run over ``student_all`` / ``teacher_all`` (the gathered batch) when given, else over the rows themselves."""
    if student.ndim != 2 or teacher.ndim != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"unime_kd needs student and teacher text features [B, d] with one B, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    s_all = student if student_all is None else student_all
    t_all = teacher if teacher_all is None else teacher_all
    target = (teacher.detach() @ t_all.detach().t() / temperature).softmax(-1)
    return F.kl_div((student @ s_all.t() / temperature).log_softmax(-1), target, reduction="batchmean")


@dataclass
class UnimeKDConfig:
    temperature: float = 0.05  # tau of both distributions

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"unime_kd temperature must be > 0, got {self.temperature}")


@register("unime_kd")
class UnimeKDLoss(nn.Module):
    """Registered :func:`unime_kd_loss` (module docstring). Options: :class:`UnimeKDConfig`."""

    extra_keys = ("teacher_text_features",)

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(UnimeKDConfig, options, "unime_kd")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        s = inputs.text_features
        t = F.normalize(inputs.require("teacher_text_features").to(s.dtype), dim=-1)
        r, w = inputs.rank, inputs.world_size
        return {"loss": unime_kd_loss(s, t, self.cfg.temperature, gather(s, r, w), gather(t, r, w))}
