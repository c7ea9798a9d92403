"""RaFA: Random Feature Alignment (Yamaguchi et al., "Post-pre-training for Modality Alignment
in Vision-Language Foundation Models", CLIP-Refine, 2025).

Pulling image and text features directly onto each other closes the modality gap but
collapses the feature space. RaFA instead pulls both features of a pair toward one shared
random reference vector r_i, drawn fresh every step from a prior p(r) (the paper's default:
the standard normal N(0, I)):

    L = 1/B sum_i 1/2 ( ||x_i - r_i||^2 + ||y_i - r_i||^2 ),    r_i ~ p(r)

so the two modalities are matched to one common distribution, which stays spread out.
The prior here is N(mean, std² I), optionally projected to the unit sphere
(``normalize=True``); ``shared=False`` draws separate references for images and texts (an
ablation of the paper's released code). The paper adds RaFA to the CLIP loss
(``{clip: 1, rafa: w}``); its code averages the squared error over the d dimensions instead
of summing, which only rescales the weight (by 2/d). The references come from torch's global
RNG, which clipforge checkpoints, so a resumed run draws the same ones;
``extra["rafa_reference"]`` ([B, d]) replaces the draw (for both modalities).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .registry import register
from .validate import check_pairs, parse_options


@dataclass
class RafaConfig:
    mean: float = 0.0  # prior N(mean, std² I)
    std: float = 1.0
    normalize: bool = False  # project the draws to the unit sphere
    shared: bool = True  # one reference per pair (the paper); False: one per feature

    def __post_init__(self):
        if self.std <= 0:
            raise ValueError(f"rafa std must be positive, got {self.std}")


def rafa_loss(image_features: Tensor, text_features: Tensor, reference: Tensor,
              text_reference: Tensor | None = None) -> Tensor:
    """Mean over pairs of (||x_i - r_i||² + ||y_i - r'_i||²) / 2, r' = r unless ``text_reference`` is given."""
    check_pairs(image_features, text_features, "rafa")
    text_reference = reference if text_reference is None else text_reference
    for name, ref in (("reference", reference), ("text_reference", text_reference)):
        if ref.shape != image_features.shape:
            raise ValueError(f"rafa {name} must match the features' shape {tuple(image_features.shape)}, "
                             f"got {tuple(ref.shape)}")
    dist_img = (image_features - reference).pow(2).sum(-1)
    dist_txt = (text_features - text_reference).pow(2).sum(-1)
    return 0.5 * (dist_img + dist_txt).mean()


def sample_reference(like: Tensor, cfg: RafaConfig, generator: torch.Generator | None = None) -> Tensor:
    """Draws from the prior, one row per sample of ``like`` ([B, d])."""
    r = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device) * cfg.std + cfg.mean
    return F.normalize(r, dim=-1) if cfg.normalize else r


@register("rafa")
class RafaLoss(nn.Module):
    """Registered :func:`rafa_loss` (options: :class:`RafaConfig`). Per sample: each process
    draws references for its own pairs, so the mean over processes is the global mean."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(RafaConfig, options, "rafa")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        img, txt = inputs.image_features, inputs.text_features
        ref = inputs.extra.get("rafa_reference")
        if ref is not None:  # given references serve both modalities
            return {"loss": rafa_loss(img, txt, ref)}
        ref = sample_reference(img, self.cfg)
        text_ref = ref if self.cfg.shared else sample_reference(txt, self.cfg)
        return {"loss": rafa_loss(img, txt, ref, text_ref)}
