"""CLIP-MoE's load-balancing auxiliary loss as a loss term (Zhang et al., 2024, "CLIP-MoE: Towards Building
Mixture of Experts for CLIP with Diversified Multiplet Upcycling"; the Switch-Transformer form
L_balance = E * sum_e f_e P_e, see :mod:`clipforge.models.moe`).

The MoE model computes the value in its forward pass, from the router logits of that pass, and returns it
as ``moe_balance_loss``; this term hands it to the composite loss, so that training adds
``weight * L_balance`` to the contrastive loss: ``loss={clip: 1.0, moe_balance: 0.01}`` (0.01 is the usual
Switch/Mixtral coefficient; the official CLIP-MoE script weights it with ``beta``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .base import LossInputs
from .registry import register
from .validate import parse_options


@dataclass
class MoEBalanceConfig:
    """No options: the weight in the loss config scales the term."""


@register("moe_balance")
class MoEBalanceLoss(nn.Module):
    """The model's ``moe_balance_loss`` output (a CLIP-MoE model, e.g. one written by clipforge upcycle)."""

    extra_keys = ("moe_balance_loss",)

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(MoEBalanceConfig, options, "moe_balance")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        value = inputs.extra.get("moe_balance_loss")
        if value is None:
            raise KeyError("the moe_balance term needs 'moe_balance_loss', which only a CLIP-MoE model returns; "
                           "train a model written by 'clipforge upcycle' (init_from=DIR) or one with a 'moe' config "
                           "section")
        return {"loss": value.float()}
