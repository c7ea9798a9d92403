"""EMA self-distillation (DeGLA): a frozen exponential-moving-average copy of the model as
teacher, and the loss that keeps the model's embeddings close to the teacher's.

Hu et al., "Decoupled Global-Local Alignment for Improving Compositional Understanding"
(2025). Fine-tuning with hard negatives makes CLIP forget; DeGLA constrains the trained
encoders to a teacher whose weights follow the model's with momentum m (0.996 there):

    theta_T <- m theta_T + (1 - m) theta                        (after every optimizer step)
    L = 1/B sum_i ( ||x_i - x^T_i||^2 + ||y_i - y^T_i||^2 )  [ + 1/B sum_i sum_k ||n_ik - n^T_ik||^2 ]

x^T, y^T (and n^T for the hard-negative captions) are the teacher's embeddings of the same
images and captions: ``extra["ema_image_features"]``, ``extra["ema_text_features"]`` and,
with ``negatives=True``, ``extra["ema_negative_text_features"]`` beside
``extra["negative_text_features"]`` (+ ``negative_text_mask``). DeGLA's code sums the squared
errors over the whole batch; we average over samples, which only rescales the weight.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .base import LossInputs
from .registry import register
from .validate import parse_options


class EMATeacher(nn.Module):
    """A frozen copy of ``model`` whose floating-point weights and buffers follow
    theta_T <- m theta_T + (1 - m) theta on every :meth:`update` (integer buffers are copied)."""

    def __init__(self, model: nn.Module, momentum: float = 0.996):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def train(self, mode: bool = True) -> EMATeacher:
        super().train(mode)
        self.model.eval()  # the teacher always runs in inference mode
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        source = model.state_dict()
        for name, t in self.model.state_dict().items():
            s = source[name].detach()
            if isinstance(s, DTensor):  # a model sharded by FSDP (distributed.strategy=fsdp): every rank gathers
                s = s.full_tensor()
            if t.dtype.is_floating_point:
                t.mul_(self.momentum).add_(s.to(t.dtype), alpha=1.0 - self.momentum)
            else:
                t.copy_(s)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def ema_distill_loss(image_features: Tensor, text_features: Tensor, ema_image: Tensor, ema_text: Tensor,
                     negatives: Tensor | None = None, ema_negatives: Tensor | None = None,
                     negative_mask: Tensor | None = None) -> Tensor:
    """DeGLA's self-distillation: mean over samples of the squared distances between the model's
    and the EMA teacher's embeddings of the image, the caption and (optionally) its [K] negatives."""
    if (negatives is None) != (ema_negatives is None):
        raise ValueError("pass both the negatives' features and the EMA teacher's features of them, or neither")
    per = (image_features - ema_image.detach()).pow(2).sum(-1) + (text_features - ema_text.detach()).pow(2).sum(-1)
    if negatives is not None:
        neg = (negatives - ema_negatives.detach()).pow(2).sum(-1)  # [B, K]
        if negative_mask is not None:
            neg = neg * negative_mask.to(neg.dtype)
        per = per + neg.sum(-1)
    return per.mean()


@dataclass
class EmaDistillConfig:
    negatives: bool = False  # also distill the hard-negative captions' embeddings, as DeGLA does

    def __post_init__(self):
        self.negatives = bool(self.negatives)


@register("ema_distill")
class EmaDistillLoss(nn.Module):
    """Registered :func:`ema_distill_loss` (per sample, so local under distribution; options:
    :class:`EmaDistillConfig`)."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(EmaDistillConfig, options, "ema_distill")
        keys = ("ema_image_features", "ema_text_features")
        negatives = ("negative_text_features", "ema_negative_text_features")
        self.extra_keys = keys + (negatives if self.cfg.negatives else ())

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        ex = inputs.extra
        negs = (inputs.require("negative_text_features"), inputs.require("ema_negative_text_features")) \
            if self.cfg.negatives else (None, None)
        loss = ema_distill_loss(inputs.image_features, inputs.text_features, inputs.require("ema_image_features"),
                                inputs.require("ema_text_features"), *negs, ex.get("negative_text_mask"))
        return {"loss": loss}
