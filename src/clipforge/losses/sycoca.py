"""SyCoCa's text-guided masked image modeling (TG-MIM) loss.

"SyCoCa: Symmetrizing Contrastive Captioners with Attentive Masking for Multimodal Alignment" (2024),
Sec. 3: CoCa's contrastive (ITC) and captioning (IC) heads are joined by a TG-MIM head that
reconstructs image patches from the caption, the local text-to-image direction that captioning lacks;
the patches to mask are chosen by attentive masking (the patches the caption attends to). The model
side is :class:`clipforge.models.coca.TextGuidedMIM` (``tgmim`` in a CoCa config); this term is its
reconstruction loss over the M masked patches of each image, with x^_im the predicted pixels of
masked patch m and x_im its pixels normalized per patch (mean 0, variance 1, MAE's target):

    L_TG-MIM = 1 / (B M P) sum_i sum_m ||x^_im - x_im||^2        (P = 3 p^2 pixels per patch)

SyCoCa's objective is ``loss={clip: 1, caption: 2, sycoca_tgmim: w}`` (CoCa's weights plus this one).
The loss is per sample: on several processes each computes the mean of its own samples, and the mean
over processes (equal local batches) is the one-process loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import LossInputs
from .registry import register
from .validate import parse_options


def tgmim_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of predicted and target pixels of the masked patches, both [B, M, P]."""
    if prediction.shape != target.shape or prediction.ndim != 3:
        raise ValueError(f"sycoca_tgmim needs tgmim_pred and tgmim_target of one shape [B, M, P], got "
                         f"{tuple(prediction.shape)} and {tuple(target.shape)}")
    dtype = torch.promote_types(torch.float32, torch.promote_types(prediction.dtype, target.dtype))  # bf16 -> fp32
    return (prediction.to(dtype) - target.to(dtype)).pow(2).mean()


@dataclass
class SycocaTgmimConfig:
    pass  # no options: the masking is the model's (TgmimConfig: mask_ratio, layers, attentive)


@register("sycoca_tgmim")
class SycocaTgmimLoss(nn.Module):
    """Registered :func:`tgmim_loss`. Needs a CoCa model with the TG-MIM branch (``clipforge train`` adds it
    to a CoCa model when this term is configured; other models are refused at start-up)."""

    extra_keys = ("tgmim_pred", "tgmim_target")
    needs_tgmim = True

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(SycocaTgmimConfig, options, "sycoca_tgmim")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        return {"loss": tgmim_loss(inputs.require("tgmim_pred"), inputs.require("tgmim_target"))}
