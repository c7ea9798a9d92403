"""SimCLR's NT-Xent between two augmented views of each image (Chen et al., "A Simple
Framework for Contrastive Learning of Visual Representations", 2020): the image-image term
that SLIP (Mu et al. 2022) and "Improved baselines for vision-language pre-training" (Fini
et al. 2023) add to the CLIP loss.

With the 2N normalized embeddings z of a batch (view 1 of every image, then view 2) and p(k)
the other view of sample k, every embedding must find its partner among the other 2N - 1:

    L = 1/(2N) sum_k -log( exp(z_k·z_p(k) / tau) / sum_{l != k} exp(z_k·z_l / tau) )

SLIP uses tau = 0.1. The second view's features come in ``extra["image_features_view2"]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather
from .registry import register
from .validate import check_pairs, parse_options


@dataclass
class SimclrConfig:
    temperature: float = 0.1

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"simclr temperature must be positive, got {self.temperature}")


def nt_xent(view1: Tensor, view2: Tensor, temperature: float = 0.1) -> Tensor:
    """NT-Xent over the 2N embeddings of two views ([N, d] each, row i of both from image i)."""
    check_pairs(view1, view2, "simclr", names=("image_features", "image_features_view2"))
    n = view1.shape[0]
    z = torch.cat([view1, view2])
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = (z @ z.t() / temperature).masked_fill(self_pairs, float("-inf"))
    partners = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, partners)


@register("simclr")
class SimclrLoss(nn.Module):
    """Registered :func:`nt_xent` (options: :class:`SimclrConfig`) on ``image_features`` and
    ``extra["image_features_view2"]`` (normalized, [B, d]), over the gathered global batch:
    every process computes the global loss."""

    extra_keys = ("image_features_view2",)

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(SimclrConfig, options, "simclr")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        v2 = inputs.require("image_features_view2")
        v1 = gather(inputs.image_features, inputs.rank, inputs.world_size)
        v2 = gather(v2, inputs.rank, inputs.world_size)
        return {"loss": nt_xent(v1, v2, self.cfg.temperature)}
