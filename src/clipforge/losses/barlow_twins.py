"""Barlow Twins across image and text (BarLIP), the redundancy-reduction companion of CLIP in
"Improved baselines for vision-language pre-training" (Fini et al. 2023), after Zbontar et al.,
"Barlow Twins: Self-Supervised Learning via Redundancy Reduction" (2021), eq. 1-2.

The paper applies the loss *across modalities*: the two "twins" are an image's embedding and its
caption's embedding (and, in its improved recipe, the augmented image views against the augmented
captions). With Z^A (images) and Z^B (captions) [N, D] standardized along the batch (zero mean,
unit variance per dimension: the affine-free batch normalization the paper's projectors end with),
the cross-correlation matrix and the loss are

    C_ij = 1/N sum_b Z^A_bi Z^B_bj
    L    = s [ sum_i (1 - C_ii)^2  +  lambda sum_i sum_{j != i} C_ij^2 ]

with lambda = 5e-3 and the scale s = 0.025 of the paper's code (``barlip_lamb``, ``barlip_scale_loss``).

Simplifications, stated: the paper computes this on the output of a separate 3-layer MLP projector
(8192 dimensions) with batch norm; here it reads the model's own embeddings (``image_features``,
``text_features``), standardized along the batch inside the loss, so the term has no parameters.
With ``image_view2=True`` the second augmented view of every image (``extra["image_features_view2"]``)
is also correlated with the captions and the two losses are averaged, as the paper averages its
view pairs. Under several processes the features are gathered, so C is the global-batch matrix
(the paper all-reduces C); every process computes the same global loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather
from .registry import register
from .validate import check_pairs, parse_options


@dataclass
class BarlowTwinsConfig:
    lambda_offdiag: float = 5e-3  # lambda: weight of the off-diagonal (redundancy) terms
    scale: float = 0.025  # s: overall scale of the paper's code
    image_view2: bool = False  # also correlate the second augmented image view with the captions
    eps: float = 1e-5  # added to the batch variance before standardizing (as batch norm does)

    def __post_init__(self):
        if self.lambda_offdiag < 0:
            raise ValueError(f"barlow_twins lambda_offdiag must be >= 0, got {self.lambda_offdiag}")
        if self.scale <= 0:
            raise ValueError(f"barlow_twins scale must be positive, got {self.scale}")
        if self.eps <= 0:
            raise ValueError(f"barlow_twins eps must be positive, got {self.eps}")
        self.image_view2 = bool(self.image_view2)


def standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Zero mean and unit (biased) variance per dimension along the batch, like affine-free batch norm."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


def barlow_twins_loss(a: Tensor, b: Tensor, lambda_offdiag: float = 5e-3, scale: float = 0.025,
                      eps: float = 1e-5) -> Tensor:
    """Barlow Twins on paired [N, D] features (row n of both from sample n): the module docstring's L."""
    check_pairs(a, b, "barlow_twins", min_batch=2)
    n = a.shape[0]
    c = standardize(a, eps).t() @ standardize(b, eps) / n
    on = (1 - torch.diagonal(c)).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return scale * (on + lambda_offdiag * off)


@register("barlow_twins")
class BarlowTwinsLoss(nn.Module):
    """Registered :func:`barlow_twins_loss` between ``image_features`` and ``text_features`` over the
    gathered global batch (options: :class:`BarlowTwinsConfig`)."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(BarlowTwinsConfig, options, "barlow_twins")
        self.extra_keys = ("image_features_view2",) if self.cfg.image_view2 else ()

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        c = self.cfg
        txt = gather(inputs.text_features, inputs.rank, inputs.world_size)
        images = [inputs.image_features] + ([inputs.require("image_features_view2")] if c.image_view2 else [])
        parts = [barlow_twins_loss(gather(v, inputs.rank, inputs.world_size), txt, c.lambda_offdiag, c.scale, c.eps)
                 for v in images]
        return {"loss": sum(parts) / len(parts)}
