"""Long-CLIP's primary component matching (Zhang et al., 2024, "Long-CLIP: Unlocking the
Long-Text Capability of CLIP", Sec. 3.2).

Fine-tuning on long captions alone makes CLIP worse at short texts. Long-CLIP matches the
long caption with the full image feature and a short summary caption with a *coarse* image
feature that keeps only the image feature's primary components. With normalized image
features x_i [B, d], long-caption features y_i, short-caption features z_i and scale t:

    mu = 1/B sum_i x_i,   X_c = X - 1 mu^T,   X_c = U S V^T            (PCA of the batch, by SVD)
    PCA_k(X) = X_c V_k V_k^T + 1 mu^T                                   (keep the first k components)
    x'_i = PCA_k(X)_i / ||PCA_k(X)_i||

    L = CLIP(x, y) + w_short * CLIP(x', z)

with CLIP the symmetric InfoNCE of :func:`clipforge.losses.clip_loss`, k = 32 and w_short = 1 in
the paper. Gradients flow through the PCA (the basis V_k included), as in the authors' code.
The authors reduce the image tower's unnormalized output; the loss here receives normalized
features and reduces those (the same directions up to each row's scale, which the centering
then mixes slightly). When k >= min(B - 1, d) the centered batch has at most k nonzero
components and PCA_k is the identity; it is then returned as such (an SVD with zero singular
values has no finite gradient).

The short captions come as ``extra["positive_text_features"]`` [B, P, d], slot 0 (the multi-positive
input): the training program delivers the first sentence of each sample's longest caption
there with ``data.positive_source=first_sentence``, and the longest caption itself as the main
caption with ``data.caption_policy=longest``. Across processes the PCA runs over each process's
local batch (as in the authors' code) and the contrastive terms are batch-global.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .clip import ClipLoss, clip_loss
from .registry import register
from .validate import check_pairs, parse_options


@dataclass
class LongClipConfig:
    components: int = 32  # k: principal components kept for the short-caption image feature
    short_weight: float = 1.0  # w_short
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.components < 1:
            raise ValueError(f"long_clip components must be >= 1, got {self.components}")
        if self.short_weight < 0:
            raise ValueError(f"long_clip short_weight must be >= 0, got {self.short_weight}")


def pca_reconstruct(x: Tensor, k: int) -> Tensor:
    """Rows of ``x`` [B, d] projected onto the batch's first ``k`` principal components (plus the mean)."""
    if x.ndim != 2:
        raise ValueError(f"pca_reconstruct expects [B, d] features, got {tuple(x.shape)}")
    if k >= min(x.shape[0] - 1, x.shape[1]):
        return x
    dtype = x.dtype
    x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    mean = x.mean(dim=0, keepdim=True)
    centered = x - mean
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    basis = vh[:k].t()  # [d, k]
    return ((centered @ basis) @ basis.t() + mean).to(dtype)


def long_clip_loss(image_features: Tensor, long_text_features: Tensor, short_text_features: Tensor, logit_scale,
                   components: int = 32, short_weight: float = 1.0, label_smoothing: float = 0.0) -> Tensor:
    """CLIP(x, long) + w * CLIP(normalize(PCA_k(x)), short) on one batch (module docstring)."""
    check_pairs(image_features, long_text_features, "long_clip", ("image_features", "long text features"))
    check_pairs(image_features, short_text_features, "long_clip", ("image_features", "short text features"))
    coarse = F.normalize(pca_reconstruct(image_features, components), dim=-1)
    return (clip_loss(image_features, long_text_features, logit_scale, label_smoothing)
            + short_weight * clip_loss(coarse, short_text_features, logit_scale, label_smoothing))


@register("long_clip")
class LongClipLoss(nn.Module):
    """Registered :func:`long_clip_loss` (options: the fields of :class:`LongClipConfig`); the long
    captions are the main captions (``text_features``), the short ones ``positive_text_features[:, 0]``."""

    extra_keys = ("positive_text_features",)
    # what the training program must feed: the longest caption as the main one, its first sentence as slot 0
    requires_data = {"caption_policy": "longest", "positive_source": "first_sentence"}

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(LongClipConfig, options, "long_clip")
        self._clip = ClipLoss(label_smoothing=self.cfg.label_smoothing)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        short = inputs.require("positive_text_features")
        if short.ndim != 3:
            raise ValueError(f"long_clip reads its short captions from positive_text_features [B, P, d] (slot 0), got "
                             f"{tuple(short.shape)}")
        mask = inputs.extra.get("positive_text_mask")
        if mask is not None and not bool(mask[:, 0].all()):
            raise ValueError("long_clip needs a short caption for every sample (positive_text_mask[:, 0] all True); "
                             "train with data.positive_source=first_sentence")
        img = inputs.image_features
        coarse = F.normalize(pca_reconstruct(img, self.cfg.components), dim=-1)
        long_part = self._clip(inputs)["loss"]
        short_inputs = LossInputs(coarse, short[:, 0], inputs.logit_scale, rank=inputs.rank,
                                  world_size=inputs.world_size)
        short_part = self._clip(short_inputs)["loss"]
        return {"loss": long_part + self.cfg.short_weight * short_part, "long": long_part.detach(),
                "short": short_part.detach()}
