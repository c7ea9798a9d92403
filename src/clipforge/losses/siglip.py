"""SigLIP's pairwise sigmoid loss.

Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (2023). Every image-text pair of
the batch is its own binary problem, matched or not, with no softmax over the batch. With
logits s_ij = t x_i·y_j + b and labels z_ii = 1, z_ij = -1 (i != j), the loss sums the
negative log-likelihood over all B x B pairs and divides by the batch size B:

    L = -1/B * sum_i sum_j log sigmoid(z_ij * s_ij)

The paper initializes t = 10 (log t = log 10) and b = -10, so that the many negatives start
with a small loss. ``chunk_size`` gives the same value and gradients in O(B·d + chunk·B)
extra memory (:mod:`.chunked`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .chunked import chunked_pairwise_sigmoid
from .gather import gather, local_offset
from .registry import register
from .validate import check_pairs, parse_options


@dataclass
class SigLipConfig:
    chunk_size: int | None = None  # rows per block of the exact chunked form; None: dense logits

    def __post_init__(self):
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"siglip chunk_size must be a positive number of rows (or null), got {self.chunk_size}")


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float,
                chunk_size: int | None = None) -> Tensor:
    """Pairwise sigmoid loss summed over all B x B pairs and divided by B."""
    check_pairs(image_features, text_features, "siglip_loss")
    if chunk_size:
        return chunked_pairwise_sigmoid(image_features, text_features, logit_scale, logit_bias, 0, chunk_size)
    logits = logit_scale * image_features @ text_features.t() + logit_bias
    n = logits.shape[0]
    z = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / n


@register("siglip")
class SigLipLoss(nn.Module):
    """Registered term for :func:`siglip_loss`; needs the model's ``logit_bias``.

    Across processes, local images are scored against all gathered texts; only the pairs at
    this process's global offset are positives. Each process divides by its local batch size
    n, so the mean over the W processes is sum over all (W n)² pairs / (W n): the global-batch
    loss. (The paper's chunked all-device implementation passes text blocks around a ring; the
    sum is the same.) ``chunk_size`` bounds memory.
    """

    needs_logit_bias = True  # the training program refuses a model without one, before the first step

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(SigLipConfig, options, "siglip")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        bias = inputs.require("logit_bias")
        img, txt, scale, chunk = inputs.image_features, inputs.text_features, inputs.logit_scale, self.cfg.chunk_size
        if inputs.world_size <= 1:
            return {"loss": siglip_loss(img, txt, scale, bias, chunk)}
        check_pairs(img, txt, "siglip")
        all_txt = gather(txt, inputs.rank, inputs.world_size)
        offset = local_offset(img.shape[0], inputs.rank)
        if chunk:
            return {"loss": chunked_pairwise_sigmoid(img, all_txt, scale, bias, offset, chunk)}
        logits = scale * img @ all_txt.t() + bias
        z = -torch.ones_like(logits)
        idx = torch.arange(img.shape[0], device=img.device)
        z[idx, idx + offset] = 1
        return {"loss": -F.logsigmoid(z * logits).sum() / img.shape[0]}
