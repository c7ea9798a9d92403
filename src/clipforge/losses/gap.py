"""Uniformity and alignment: the terms of "It's Not a Modality Gap: Characterizing and
Addressing the Contrastive Gap" (Fahim, Murphy & Fyshe, 2024), after Wang & Isola (2020).

The paper attributes the gap between CLIP's image and text clusters to low uniformity of the
embeddings and closes it by adding the unimodal uniformity and alignment objectives, adapted
to two modalities, to the CLIP loss. With all 2B L2-normalized embeddings of a batch pooled
into one set Z (images and texts together):

    uniformity = log( 1/(2B(2B-1)) sum_{u != v in Z} exp(-t ||u - v||^2) )   (t = 2)
    alignment  = 1/B sum_i ||x_i - y_i||^alpha                                (alpha = 2)

Uniformity is low when the embeddings spread over the sphere; alignment is low when each
image sits on its caption. They are separate registered terms, so a config composes them:
``{clip: 1, uniformity: 0.1, alignment: 0.1}``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather
from .registry import register
from .validate import check_pairs, parse_options


@dataclass
class UniformityConfig:
    t: float = 2.0  # sharpness of the Gaussian potential

    def __post_init__(self):
        if self.t <= 0:
            raise ValueError(f"uniformity t must be positive, got {self.t}")


@dataclass
class AlignmentConfig:
    alpha: float = 2.0  # power of the distance

    def __post_init__(self):
        if self.alpha <= 0:
            raise ValueError(f"alignment alpha must be positive, got {self.alpha}")


def uniformity_loss(image_features: Tensor, text_features: Tensor, t: float = 2.0) -> Tensor:
    """log of the mean Gaussian potential exp(-t ||u - v||^2) over all distinct pairs of the joint set."""
    check_pairs(image_features, text_features, "uniformity")
    z = torch.cat([image_features, text_features])
    n = z.shape[0]
    norms = (z * z).sum(-1)
    sq = (norms[:, None] + norms[None, :] - 2 * z @ z.t()).clamp_min(0)  # smooth, unlike a sqrt-based cdist
    off = ~torch.eye(n, dtype=torch.bool, device=z.device)
    return torch.logsumexp(-t * sq[off], dim=0) - math.log(n * (n - 1))


def alignment_loss(image_features: Tensor, text_features: Tensor, alpha: float = 2.0) -> Tensor:
    """Mean over positive pairs of ||x_i - y_i||^alpha."""
    check_pairs(image_features, text_features, "alignment")
    sq = (image_features - text_features).pow(2).sum(-1)
    return sq.mean() if alpha == 2 else sq.pow(alpha / 2).mean()


@register("uniformity")
class UniformityLoss(nn.Module):
    """Registered :func:`uniformity_loss` (options: :class:`UniformityConfig`) over the gathered
    (global) batch: every process computes the global value."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(UniformityConfig, options, "uniformity")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        img = gather(inputs.image_features, inputs.rank, inputs.world_size)
        txt = gather(inputs.text_features, inputs.rank, inputs.world_size)
        return {"loss": uniformity_loss(img, txt, self.cfg.t)}


@register("alignment")
class AlignmentLoss(nn.Module):
    """Registered :func:`alignment_loss` (options: :class:`AlignmentConfig`). Per sample: a
    positive pair lives on one process, so the mean over processes is the global mean."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(AlignmentConfig, options, "alignment")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        return {"loss": alignment_loss(inputs.image_features, inputs.text_features, self.cfg.alpha)}
