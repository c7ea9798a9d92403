"""m^2-Mix: geodesic multi-modal mixup (Oh et al., "Geodesic Multi-Modal Mixup for Robust
Fine-Tuning", 2023).

Hard negatives are made on the sphere by spherical interpolation (slerp) of an image and a
text embedding of the same pair,

    m_j = slerp(x_j, y_j, lam) = sin(lam θ_j)/sin θ_j · x_j + sin((1-lam) θ_j)/sin θ_j · y_j,
    θ_j = arccos(x_j·y_j),  lam ~ Beta(alpha, alpha),

a unit vector between the two modalities, so it is harder to tell from a true partner than
an ordinary negative. The m²-Mix term contrasts each image's positive pair with the mixtures
of the *other* pairs as its negatives, and likewise each text:

    L = 1/2 mean_i [ -log( e^{t x_i·y_i} / (e^{t x_i·y_i} + sum_{j != i} e^{t' x_i·m_j}) )
                     -log( e^{t y_i·x_i} / (e^{t y_i·x_i} + sum_{j != i} e^{t' y_i·m_j}) ) ]

with t the logit scale and t' = ``mix_scale`` (default: t). The paper fine-tunes with the CLIP
loss plus this term, ``{clip: 1, m2mix: w}``; its code draws one lam per step with alpha 0.5.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather, local_offset
from .registry import register
from .validate import check_pairs, parse_options


@dataclass
class M2MixConfig:
    alpha: float = 0.5  # lam ~ Beta(alpha, alpha)
    mix_scale: float | None = None  # t' on the mixed negatives; None: the model's logit scale

    def __post_init__(self):
        if self.alpha <= 0:
            raise ValueError(f"m2mix alpha must be positive, got {self.alpha}")
        if self.mix_scale is not None and self.mix_scale <= 0:
            raise ValueError(f"m2mix mix_scale must be positive (or null), got {self.mix_scale}")


def slerp(a: Tensor, b: Tensor, lam: Tensor | float, eps: float = 1e-6) -> Tensor:
    """Spherical interpolation of unit rows: lam = 1 gives a, lam = 0 gives b."""
    lam = torch.as_tensor(lam, dtype=a.dtype, device=a.device)
    if lam.ndim == 1:
        lam = lam[:, None]
    cos = (a * b).sum(-1, keepdim=True).clamp(-1 + eps, 1 - eps)
    theta = torch.acos(cos)
    return (torch.sin(lam * theta) * a + torch.sin((1 - lam) * theta) * b) / torch.sin(theta)


def m2mix_loss(image_features: Tensor, text_features: Tensor, logit_scale, lam, mix_scale=None,
               all_images: Tensor | None = None, all_texts: Tensor | None = None, offset: int = 0) -> Tensor:
    """Local pairs (rows) against the mixtures of the gathered pairs ``all_*`` (default: the local batch)."""
    check_pairs(image_features, text_features, "m2mix")
    x, y = image_features, text_features
    all_x = x if all_images is None else all_images
    all_y = y if all_texts is None else all_texts
    mix_scale = logit_scale if mix_scale is None else mix_scale
    n = x.shape[0]
    mixed = slerp(all_x, all_y, lam)
    own = torch.zeros(n, all_x.shape[0], dtype=torch.bool, device=x.device)
    own[torch.arange(n), torch.arange(n) + offset] = True
    positive = logit_scale * (x * y).sum(-1, keepdim=True)
    zeros = torch.zeros(n, dtype=torch.long, device=x.device)
    loss = 0.0
    for q in (x, y):
        negatives = (mix_scale * q @ mixed.t()).masked_fill(own, float("-inf"))
        loss = loss + F.cross_entropy(torch.cat([positive, negatives], dim=1), zeros)
    return loss / 2


@register("m2mix")
class M2MixLoss(nn.Module):
    """Registered :func:`m2mix_loss` (options: :class:`M2MixConfig`); lam ~ Beta(alpha, alpha) from
    torch's global RNG each call (``extra["m2mix_lambda"]`` overrides it). Local rows against the
    gathered mixtures; under torch.distributed each process draws its own lam unless the
    processes share their RNG seed."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(M2MixConfig, options, "m2mix")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        lam = inputs.extra.get("m2mix_lambda")
        if lam is None:
            a = torch.tensor(self.cfg.alpha)
            lam = float(torch.distributions.Beta(a, a).sample())
        img, txt = inputs.image_features, inputs.text_features
        loss = m2mix_loss(img, txt, inputs.logit_scale, lam, self.cfg.mix_scale,
                          gather(img, inputs.rank, inputs.world_size), gather(txt, inputs.rank, inputs.world_size),
                          local_offset(img.shape[0], inputs.rank))
        return {"loss": loss, "lambda": torch.as_tensor(lam, dtype=torch.float32).mean()}
