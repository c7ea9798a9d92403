"""CLOOB: InfoLOOB on Hopfield-retrieved embeddings (Fürst et al., "CLOOB: Modern Hopfield
Networks with InfoLOOB Outperform CLIP", 2022).

The batch's image embeddings U = (u_1..u_N) and text embeddings V = (v_1..v_N) are the two
stores of a modern Hopfield network. One update with inverse temperature beta retrieves from
store K, for a query q, the normalized softmax-weighted average of the stored patterns:

    retrieve(q, K) = normalize( sum_k softmax_k(beta q·K_k) K_k )

Every sample is replaced by four retrievals: U_x (image store, image query), U_y (image
store, text query), V_x (text store, image query), V_y (text store, text query). Retrieval
averages an embedding with its close neighbours in the store, which enriches the covariance
structure. The objective is InfoLOOB, "leave one out": the positive pair is left out of the
denominator, which avoids the saturation of InfoNCE that the retrieval would worsen:

    LOOB(a, b) = -1/N sum_i log( exp(a_i·b_i / tau) / sum_{j != i} exp(a_i·b_j / tau) )
    L = tau * [ LOOB(U_x, U_y) + LOOB(V_y, V_x) ]

(the factor tau keeps the gradient scale independent of the temperature, as in the paper's
code). Defaults follow the paper's Conceptual Captions setting: 1/tau = 30, beta = 8.
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
class CloobConfig:
    tau: float = 1 / 30  # InfoLOOB temperature
    beta: float = 8.0  # inverse temperature of the Hopfield retrieval

    def __post_init__(self):
        if self.tau <= 0 or self.beta <= 0:
            raise ValueError(f"cloob tau and beta must be positive, got tau={self.tau}, beta={self.beta}")


def hopfield_retrieve(queries: Tensor, store: Tensor, beta: float) -> Tensor:
    """One update of a modern Hopfield network: normalize(softmax(beta q Kᵀ) K), row-wise."""
    return F.normalize(torch.softmax(beta * queries @ store.t(), dim=-1) @ store, dim=-1)


def info_loob(a: Tensor, b: Tensor, tau: float) -> Tensor:
    """Mean over rows of -log( exp(a_i·b_i/tau) / sum_{j != i} exp(a_i·b_j/tau) )."""
    logits = a @ b.t() / tau
    off = logits.masked_fill(torch.eye(len(a), dtype=torch.bool, device=a.device), float("-inf"))
    return (torch.logsumexp(off, dim=1) - logits.diagonal()).mean()


def cloob_loss(image_features: Tensor, text_features: Tensor, tau: float = 1 / 30, beta: float = 8.0) -> Tensor:
    """CLOOB on one batch of normalized [N, d] pairs (N >= 2: a row needs a negative)."""
    check_pairs(image_features, text_features, "cloob", min_batch=2)
    u_x = hopfield_retrieve(image_features, image_features, beta)
    u_y = hopfield_retrieve(text_features, image_features, beta)
    v_x = hopfield_retrieve(image_features, text_features, beta)
    v_y = hopfield_retrieve(text_features, text_features, beta)
    return tau * (info_loob(u_x, u_y, tau) + info_loob(v_y, v_x, tau))


@register("cloob")
class CloobLoss(nn.Module):
    """Registered :func:`cloob_loss` (options: :class:`CloobConfig`). The Hopfield stores are the
    gathered global batch, so every process computes the global loss; gradients reach each
    process's features through the gather."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(CloobConfig, options, "cloob")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        img = gather(inputs.image_features, inputs.rank, inputs.world_size)
        txt = gather(inputs.text_features, inputs.rank, inputs.world_size)
        return {"loss": cloob_loss(img, txt, self.cfg.tau, self.cfg.beta)}
