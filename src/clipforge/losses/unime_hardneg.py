"""UniME's hard-negative-enhanced contrast (Gu et al., 2025, "Breaking the Modality Barrier: Universal Embedding
Learning with Multimodal LLMs", stage 2: false-negative filtering, hard-negative sampling, Sec. 3.2).

For a query q_i with positive candidate c_i among the batch's candidates c_1..c_N (normalized; s_ij = q_i . c_j):

    alpha_i = s_ii + beta                                   the false-negative threshold (beta: a margin)
    F_i = {j != i : s_ij > alpha_i}                         false negatives: more similar than the positive by beta
    H_i = the k candidates j not in F_i, j != i, of largest s_ij      (fewer when fewer remain)
    L_i = -log( exp(s_ii / tau) / (exp(s_ii / tau) + sum_{j in H_i} exp(s_ij / tau)) )

and L = mean_i L_i. The selection (F_i, H_i) carries no gradient; the kept similarities do. With
``symmetric=true`` the loss is the mean of image->text (queries: images, candidates: texts) and text->image.

Inputs: ``image_features``, ``text_features``. Global: each process's queries against the gathered candidates.
:func:`false_negative_mask` and :func:`hard_negative_indices` are the two selection steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather, local_offset
from .registry import register
from .validate import parse_options


def false_negative_mask(sims: Tensor, positives: Tensor, beta: float) -> Tensor:
    """[B, N] bool: True where candidate j is a false negative of query i (s_ij > s_i,pos(i) + beta, j != pos(i))."""
    pos = sims.gather(1, positives[:, None])
    out = sims > pos + beta
    out[torch.arange(len(sims), device=sims.device), positives] = False
    return out


def hard_negative_indices(sims: Tensor, positives: Tensor, beta: float, k: int) -> tuple[Tensor, Tensor]:
    """(indices [B, k'], valid [B, k']) of each query's k hardest negatives among the candidates that are neither
    its positive nor false negatives, k' = min(k, N - 1); ``valid`` is False where fewer than k' remain."""
    blocked = false_negative_mask(sims, positives, beta)
    blocked[torch.arange(len(sims), device=sims.device), positives] = True
    k = min(k, sims.shape[1] - 1)
    values, idx = sims.detach().masked_fill(blocked, float("-inf")).topk(k, dim=1)
    return idx, torch.isfinite(values)


def unime_hardneg_loss(queries: Tensor, candidates: Tensor, temperature: float = 0.05, beta: float = 0.1, k: int = 8,
                       positives: Tensor | None = None) -> Tensor:
    """The mean of L_i over the queries [B, d] against the candidates [N, d] (module docstring); ``positives`` [B]:
    the index of each query's positive (default: i)."""
    if queries.ndim != 2 or candidates.ndim != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"unime_hardneg needs queries [B, d] and candidates [N, d], got {tuple(queries.shape)} and "
                         f"{tuple(candidates.shape)}")
    if positives is None:
        positives = torch.arange(len(queries), device=queries.device)
    sims = queries @ candidates.t()
    idx, valid = hard_negative_indices(sims, positives, beta, k)
    negatives = sims.gather(1, idx).masked_fill(~valid, float("-inf"))
    logits = torch.cat([sims.gather(1, positives[:, None]), negatives], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(queries), dtype=torch.long, device=queries.device))


@dataclass
class UnimeHardnegConfig:
    temperature: float = 0.05
    beta: float = 0.1  # false-negative margin: candidates above s_pos + beta are left out
    k: int = 8  # hard negatives per query
    symmetric: bool = True  # also text -> image

    def __post_init__(self):
        if self.temperature <= 0 or self.k < 1:
            raise ValueError(f"unime_hardneg needs temperature > 0 and k >= 1, got {self.temperature} and {self.k}")


@register("unime_hardneg")
class UnimeHardnegLoss(nn.Module):
    """Registered :func:`unime_hardneg_loss` over images and texts (module docstring). Options:
    :class:`UnimeHardnegConfig`."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(UnimeHardnegConfig, options, "unime_hardneg")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        x, y, r, w, c = inputs.image_features, inputs.text_features, inputs.rank, inputs.world_size, self.cfg
        pos = local_offset(len(x), r) + torch.arange(len(x), device=x.device)
        i2t = unime_hardneg_loss(x, gather(y, r, w), c.temperature, c.beta, c.k, pos)
        if not c.symmetric:
            return {"loss": i2t}
        t2i = unime_hardneg_loss(y, gather(x, r, w), c.temperature, c.beta, c.k, pos)
        return {"loss": 0.5 * (i2t + t2i), "i2t": i2t.detach(), "t2i": t2i.detach()}
