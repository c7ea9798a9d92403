"""The counting loss of "Teaching CLIP to Count to Ten" (Paiss et al., ICCV 2023).

For an image whose caption states how many objects it shows, a counterfactual caption
with a wrong number ("six dogs" for three dogs) is made automatically; the model must
score the true caption above it. With image x_i, true caption y_i and counterfactual c_i
(``extra["count_negative_text_features"]`` [B, d]), over the samples that have one
(``extra["count_mask"]`` [B], True = counted sample):

    L_count = 1/|M| sum_{i in M} -log( exp(t x_i·y_i) / (exp(t x_i·y_i) + exp(t x_i·c_i)) )

It is trained beside the CLIP loss, ``{clip: 1.0, counting: lam}``. A batch with no counted
sample contributes zero (still connected to the graph). The counterfactual should be the
true caption with only the number changed; when the sample's caption y_i is worded
differently, ``extra["count_positive_text_features"]`` [B, d] gives the true-count caption
the counterfactual was written from, and it replaces y_i in the pair.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather
from .registry import register
from .validate import parse_options


def counting_terms(image_features: Tensor, text_features: Tensor, counterfactual: Tensor, logit_scale) -> Tensor:
    """Per sample: -log(exp(t x_i·y_i) / (exp(t x_i·y_i) + exp(t x_i·c_i))) = softplus(t x_i·c_i - t x_i·y_i)."""
    if counterfactual.shape != text_features.shape:
        raise ValueError(f"count_negative_text_features must be [B, d] like the captions {tuple(text_features.shape)}, "
                         f"got {tuple(counterfactual.shape)}")
    pos = logit_scale * (image_features * text_features).sum(-1)
    neg = logit_scale * (image_features * counterfactual).sum(-1)
    return F.softplus(neg - pos)


def _masked_mean(per: Tensor, mask: Tensor | None, rank: int = 0, world_size: int = 1) -> Tensor:
    """Mean over the counted samples of the whole (gathered) batch; this process contributes
    its own terms scaled so that the mean over processes is the global mean."""
    if mask is None:
        return per.mean()
    mask = mask.bool()
    counted = gather(mask.to(per.dtype), rank, world_size).sum()
    if counted == 0:
        return per.sum() * 0.0  # nothing counted anywhere: zero, still connected to the graph
    return (per * mask.to(per.dtype)).sum() * world_size / counted


def counting_loss(image_features: Tensor, text_features: Tensor, counterfactual: Tensor, logit_scale,
                  mask: Tensor | None = None) -> Tensor:
    """Paiss et al.'s two-way softmax between the true-count and the wrong-count caption,
    averaged over the masked (counted) samples."""
    return _masked_mean(counting_terms(image_features, text_features, counterfactual, logit_scale), mask)


@dataclass
class CountingConfig:
    """``counting`` has no options."""


@register("counting")
class CountingLoss(nn.Module):
    """Registered :func:`counting_loss`; per sample, normalized by the number of counted samples
    of the whole batch, so the mean over processes equals the single-process loss. Uses
    ``count_positive_text_features`` as the true caption when given."""

    extra_keys = ("count_negative_text_features",)

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(CountingConfig, options, "counting")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        positive = inputs.extra.get("count_positive_text_features", inputs.text_features)
        per = counting_terms(inputs.image_features, positive, inputs.require("count_negative_text_features"),
                             inputs.logit_scale)
        return {"loss": _masked_mean(per, inputs.extra.get("count_mask"), inputs.rank, inputs.world_size)}
