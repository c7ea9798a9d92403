"""Norton: optimal transport for noisy correspondence between sequences (Lin et al.,
"Multi-granularity Correspondence Learning from Long-term Noisy Videos", ICLR 2024).

Sample i is a sequence of units u_i1..u_iN (``image_tokens`` [B, N, d]: image patches, or the
clips of a video) and text j a sequence w_j1..w_jL (``text_tokens`` [B, L, d] with
``text_mask`` [B, L]: words, or the captions of a paragraph). Unit similarities are
C_ij[n, l] = u_in·w_jl (tokens are L2-normalized here). The pair score s_ij mixes two
alignments, and the contrast over the batch uses targets rectified for faulty negatives.

1. Optimal transport with an alignable prompt bucket. Entropic OT (log-domain Sinkhorn,
   smoothness eps) between the units of i and of j on the similarity C_ij, with one extra row
   and column of constant similarity p (the bucket). As in Norton (after SuperGlue's dustbin)
   every real unit has mass 1/(N+M) (M = valid words of j), the bucket row has M/(N+M) and the
   bucket column N/(N+M), so the bucket can absorb any unit that matches nothing better
   than p: background patches, stop words, clips that no caption describes. Then

       s^OT_ij = sum_{n,l} Q_ij[n, l] C_ij[n, l] / sum_{n,l} Q_ij[n, l]     (real units only)

   p is ``bucket`` or, with ``bucket_quantile`` q, Norton's choice: the q-quantile of the
   matched pairs' unit similarities {C_ii[n, l]}. As in Norton the plan is a constant for
   the gradient (``plan_grad=True`` backpropagates through the Sinkhorn iterations instead).
2. Soft-maximum (log-sum-exp) operator for token-level similarity, Norton's fine-grained
   alignment: every word finds its soft-best unit and every unit its soft-best word,

       s^LSE_ij = 1/2 [ mean_l alpha log sum_n exp(C_ij[n,l]/alpha) + mean_n alpha log sum_l exp(C_ij[n,l]/alpha) ]

   and s_ij = (1 - lse_weight) s^OT_ij + lse_weight s^LSE_ij (Norton averages its coarse and
   fine-grained similarities with equal weight: lse_weight = 0.5).
3. Faulty negatives: another text of the batch may truly match sample i. The targets are
   rectified by a transport plan over the batch, P = Sinkhorn(t s / target_eps) with uniform
   marginals, rows rescaled to sum to 1 and held constant:

       T = (1 - beta) I + beta P,    L = 1/2 [ mean_i CE(T_i., softmax_j t s_ij) + mean_j CE(T_.j, softmax_i t s_ij) ]

With beta = 0, no bucket, lse_weight = 0 and one unit per sequence, s_ij = u_i·w_j and L is
the CLIP loss. Memory: the unit similarities of all pairs, B^2 N L numbers (Norton's cost too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather
from .registry import register
from .validate import parse_options

MASKED = -1e4  # similarity of padded words: never chosen, yet finite for the log-domain iterations


@dataclass
class NortonConfig:
    bucket: float | None = 0.0  # similarity p of the alignable prompt bucket; None: no bucket
    bucket_quantile: float | None = None  # Norton's prompt ratio: p = this quantile of the matched pairs' similarities
    eps: float = 0.1  # entropic smoothness of the token-level transport
    iters: int = 50  # Sinkhorn iterations
    lse_weight: float = 0.5  # weight of the soft-maximum score against the transport score
    alpha: float = 0.1  # temperature of the soft maximum
    beta: float = 0.3  # weight of the transport plan in the rectified targets
    target_eps: float = 1.0  # smoothness of the batch-level plan, on the logits
    plan_grad: bool = False  # backpropagate through the token-level Sinkhorn iterations

    def __post_init__(self):
        if not 0 <= self.lse_weight <= 1 or not 0 <= self.beta <= 1:
            raise ValueError(f"norton lse_weight and beta must lie in [0, 1], got {self.lse_weight}, {self.beta}")
        if min(self.eps, self.alpha, self.target_eps) <= 0 or self.iters < 1:
            raise ValueError("norton eps, alpha and target_eps must be > 0 and iters >= 1")
        if self.bucket_quantile is not None and not 0 <= self.bucket_quantile <= 1:
            raise ValueError(f"norton bucket_quantile must lie in [0, 1], got {self.bucket_quantile}")


def sinkhorn_log(scores: Tensor, log_a: Tensor, log_b: Tensor, eps: float, iters: int) -> Tensor:
    """Entropic OT plan maximizing <Q, scores> + eps H(Q) with marginals exp(log_a) [..., n] and
    exp(log_b) [..., m], by Sinkhorn iterations in the log domain; batched over leading dims."""
    k = scores / eps
    log_u, log_v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(iters):
        log_u = log_a - torch.logsumexp(k + log_v.unsqueeze(-2), dim=-1)
        log_v = log_b - torch.logsumexp(k + log_u.unsqueeze(-1), dim=-2)
    return torch.exp(k + log_u.unsqueeze(-1) + log_v.unsqueeze(-2))


def unit_similarities(units: Tensor, words: Tensor) -> Tensor:
    """C[i, j, n, l] = u_in·w_jl for every pair of the batch: [B, B, N, L]."""
    return torch.einsum("ind,jld->ijnl", units, words)


def bucket_marginals(n: int, word_mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """log marginals [B, N+1] of the units and [B, L+1] of the words (per text j) with the prompt bucket
    last: 1/(N+M) per real unit, M/(N+M) and N/(N+M) for the bucket (M = valid words; padding: 0)."""
    m = word_mask.sum(-1, keepdim=True).to(dtype)  # [B, 1]
    total = n + m
    rows = torch.cat([torch.ones(word_mask.shape[0], n, dtype=dtype, device=word_mask.device) / total, m / total], 1)
    cols = torch.cat([word_mask.to(dtype) / total, n / total], 1)
    return rows.log(), cols.log()


def ot_scores(units: Tensor, words: Tensor, word_mask: Tensor, bucket: Tensor | None, eps: float, iters: int,
              plan_grad: bool = False) -> Tensor:
    """s^OT[i, j]: transport-weighted mean unit similarity, with the prompt bucket when ``bucket`` is given."""
    b, n, l = units.shape[0], units.shape[1], words.shape[1]
    sim = unit_similarities(units, words)
    cost = sim.masked_fill(~word_mask[None, :, None, :], MASKED)
    if bucket is None:
        log_a = torch.full((b, b, n), -math.log(n), dtype=sim.dtype, device=sim.device)
        log_b = (word_mask.to(sim.dtype) / word_mask.sum(-1, keepdim=True)).log()[None].expand(b, b, l)
    else:
        p = bucket.to(sim.dtype)
        cost = torch.cat([cost, p.expand(b, b, n, 1)], dim=3)
        cost = torch.cat([cost, p.expand(b, b, 1, l + 1)], dim=2)
        rows, cols = bucket_marginals(n, word_mask, sim.dtype)
        log_a, log_b = rows[None].expand(b, b, n + 1), cols[None].expand(b, b, l + 1)
    with torch.set_grad_enabled(plan_grad and torch.is_grad_enabled()):
        plan = sinkhorn_log(cost if plan_grad else cost.detach(), log_a, log_b, eps, iters)
    q = plan[..., :n, :l] * word_mask[None, :, None, :]
    return (q * sim).sum((-1, -2)) / q.sum((-1, -2)).clamp(min=1e-30)


def soft_maximum_scores(units: Tensor, words: Tensor, word_mask: Tensor, alpha: float) -> Tensor:
    """s^LSE[i, j]: mean over words of the soft-max over units and over units of the soft-max over words."""
    sim = unit_similarities(units, words) / alpha
    valid = word_mask[None, :, None, :]
    per_word = alpha * torch.logsumexp(sim, dim=2)  # [B, B, L]
    per_word = (per_word * word_mask[None]).sum(-1) / word_mask.sum(-1)[None]
    per_unit = (alpha * torch.logsumexp(sim.masked_fill(~valid, float("-inf")), dim=3)).mean(-1)
    return 0.5 * (per_word + per_unit)


def rectified_targets(logits: Tensor, beta: float, eps: float = 1.0, iters: int = 50) -> Tensor:
    """T = (1 - beta) I + beta P with P the batch transport plan of the (detached) logits, rows summing to 1."""
    b = logits.shape[0]
    eye = torch.eye(b, dtype=logits.dtype, device=logits.device)
    if beta == 0:
        return eye
    uniform = torch.full((b,), -math.log(b), dtype=logits.dtype, device=logits.device)
    plan = sinkhorn_log(logits.detach(), uniform, uniform, eps, iters)
    return (1 - beta) * eye + beta * plan / plan.sum(-1, keepdim=True)


def matched_quantile(units: Tensor, words: Tensor, word_mask: Tensor, q: float) -> Tensor:
    """Norton's bucket value: the q-quantile of the unit similarities of the matched pairs (i, i), detached."""
    sim = torch.einsum("ind,ild->inl", units.detach(), words.detach())
    return torch.quantile(sim[word_mask[:, None, :].expand_as(sim)], q)


def norton_scores(units: Tensor, words: Tensor, word_mask: Tensor | None = None,
                  cfg: NortonConfig | None = None) -> Tensor:
    """The pair scores s[i, j] of step 1 and 2 (module docstring)."""
    cfg = cfg or NortonConfig()
    if units.ndim != 3 or words.ndim != 3 or units.shape[0] != words.shape[0] or units.shape[2] != words.shape[2]:
        raise ValueError(f"norton needs image_tokens [B, N, d] and text_tokens [B, L, d], got {tuple(units.shape)} "
                         f"and {tuple(words.shape)}")
    if word_mask is None:
        word_mask = torch.ones(words.shape[:2], dtype=torch.bool, device=words.device)
    word_mask = word_mask.bool()
    if not word_mask.any(-1).all():
        raise ValueError("norton: a text has no valid token (a row of text_mask is all False)")
    score = 0.0
    if cfg.lse_weight < 1:
        if cfg.bucket_quantile is not None:
            bucket = matched_quantile(units, words, word_mask, cfg.bucket_quantile)
        else:
            bucket = None if cfg.bucket is None else torch.tensor(cfg.bucket, device=units.device)
        score = (1 - cfg.lse_weight) * ot_scores(units, words, word_mask, bucket, cfg.eps, cfg.iters, cfg.plan_grad)
    if cfg.lse_weight > 0:
        score = score + cfg.lse_weight * soft_maximum_scores(units, words, word_mask, cfg.alpha)
    return score


def norton_loss(units: Tensor, words: Tensor, logit_scale, word_mask: Tensor | None = None,
                cfg: NortonConfig | None = None) -> Tensor:
    """Norton's contrast with rectified targets on the pair scores (module docstring)."""
    cfg = cfg or NortonConfig()
    logits = logit_scale * norton_scores(units, words, word_mask, cfg)
    targets = rectified_targets(logits, cfg.beta, cfg.target_eps, cfg.iters)
    rows = -(targets * logits.log_softmax(-1)).sum(-1).mean()
    cols = -(targets.t() * logits.t().log_softmax(-1)).sum(-1).mean()
    return 0.5 * (rows + cols)


@register("norton")
class NortonLoss(nn.Module):
    """Registered :func:`norton_loss` on ``image_tokens`` and ``text_tokens`` (+ ``text_mask``).

    Options are the fields of :class:`NortonConfig`. The batch-level plan couples all pairs,
    so every process computes the loss of the gathered batch; gradients reach each
    process's tokens through the gather.
    """

    extra_keys = ("image_tokens", "text_tokens")  # declared so that a training program lacking them fails at start-up

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(NortonConfig, options, "norton")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        r, w = inputs.rank, inputs.world_size
        units = gather(F.normalize(inputs.require("image_tokens"), dim=-1), r, w)
        words = gather(F.normalize(inputs.require("text_tokens"), dim=-1), r, w)
        mask = inputs.text_mask
        if mask is not None and w > 1:
            mask = gather(mask.to(units.dtype), r, w).bool()
        return {"loss": norton_loss(units, words, inputs.logit_scale, mask, self.cfg)}
