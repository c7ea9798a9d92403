"""Symile: contrastive learning over any number of modalities with the multilinear inner
product (Saporta et al., "Contrasting with Symile: Simple Model-Agnostic Representation
Learning for Unlimited Modalities", 2024).

The score of a tuple of M embeddings is their multilinear inner product,
MIP(a, b, c, ...) = sum_k a_k b_k c_k ... (for M = 2 the dot product). Symile lower-bounds
the total correlation of the M modalities: for every modality m taken as the anchor, the
positive tuple of sample i must beat negative tuples whose other modalities are drawn
*independently* from the batch, i.e. from the product of their marginals:

    L = 1/M sum_m mean_i -log( exp(t MIP(x^m_i, x^{-m}_i)) / sum_{c in C_i} exp(t MIP(x^m_i, c)) )

where C_i holds the positive tuple and the negatives:

- ``negatives="n"`` (O(N) per row): N - 1 negatives (x^{m1}_j, x^{m2}_{σ2(j)}, x^{m3}_{σ3(j)}, ...),
  j != i, the other modalities m1, m2, ... taken in order and each after the first re-indexed
  by its own permutation σ, so their components come from different samples (the paper's
  code shuffles the non-anchor modalities). ``permutation="shift"`` uses the cyclic shifts
  σk(j) = j + k - 1 (mod N), deterministic and identical on every process;
  ``permutation="random"`` draws a fresh permutation from torch's RNG for each anchor and
  modality, as the paper's code does.
- ``negatives="n_squared"``: every combination (x^{m1}_{j1}, x^{m2}_{j2}, ...) of the other
  modalities, N^(M-1) tuples per row, the positive at j1 = j2 = ... = i (for M = 3 the
  paper's O(N²) sampling).

For M = 2 both modes are exactly the CLIP loss (no permutation applies to a single other
modality).
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

MAX_N_SQUARED_CANDIDATES = 1_000_000


@dataclass
class SymileConfig:
    negatives: str = "n"  # "n" (O(N) per row) or "n_squared" (all combinations)
    permutation: str = "shift"  # for negatives="n": "shift" (deterministic) or "random" (torch RNG)

    def __post_init__(self):
        if self.negatives not in ("n", "n_squared"):
            raise ValueError(f"symile negatives must be 'n' or 'n_squared', got {self.negatives!r}")
        if self.permutation not in ("shift", "random"):
            raise ValueError(f"symile permutation must be 'shift' or 'random', got {self.permutation!r}")


def symile_loss(features: list[Tensor], logit_scale, negatives: str = "n", candidates: list[Tensor] | None = None,
                offset: int = 0, permutation: str = "shift") -> Tensor:
    """``features``: M >= 2 tensors [n, d] (this process's rows). ``candidates``: the same M
    modalities over the global batch ([N, d]; defaults to ``features``), whose samples
    ``offset .. offset + n - 1`` are this process's."""
    SymileConfig(negatives, permutation)
    _check(features, candidates)
    candidates = features if candidates is None else candidates
    labels = torch.arange(features[0].shape[0], device=features[0].device) + offset
    total = 0.0
    for m, anchor in enumerate(features):
        others = [f for k, f in enumerate(candidates) if k != m]
        if negatives == "n":
            logits = _n_logits(anchor, [f for k, f in enumerate(features) if k != m], others, labels, permutation)
            total = total + F.cross_entropy(logit_scale * logits, labels)
        else:
            logits, stride = _all_combination_logits(anchor, others)
            total = total + F.cross_entropy(logit_scale * logits, labels * stride)
    return total / len(features)


def _n_logits(anchor: Tensor, own_others: list[Tensor], others: list[Tensor], labels: Tensor,
              permutation: str) -> Tensor:
    """[n, N] MIPs with the re-indexed other modalities; column offset + i holds the positive tuple."""
    big_n = others[0].shape[0]
    prod = others[0]
    for k, f in enumerate(others[1:], start=1):
        if permutation == "shift":
            index = (torch.arange(big_n, device=f.device) + k) % big_n
        else:
            index = torch.randperm(big_n, device=f.device)
        prod = prod * f[index]
    logits = anchor @ prod.t()
    positive = anchor
    for f in own_others:
        positive = positive * f
    rows = torch.arange(anchor.shape[0], device=anchor.device)
    return logits.index_put((rows, labels), positive.sum(-1))


def _all_combination_logits(anchor: Tensor, others: list[Tensor]) -> tuple[Tensor, int]:
    """[n, N^(M-1)] MIPs over all combinations; the positive of row i sits at column i * stride."""
    big_n = others[0].shape[0]
    if big_n ** len(others) > MAX_N_SQUARED_CANDIDATES:
        raise ValueError(f"symile n_squared negatives would score {big_n ** len(others)} tuples per row "
                         f"(more than {MAX_N_SQUARED_CANDIDATES}); use negatives='n' or a smaller batch")
    prod = others[0]  # rows enumerate (j1, j2, ...) in row-major order
    for f in others[1:]:
        prod = (prod[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
    stride = sum(big_n ** k for k in range(len(others)))  # flat index of (i, i, ..., i)
    return anchor @ prod.t(), stride


def _check(features: list[Tensor], candidates: list[Tensor] | None) -> None:
    if len(features) < 2:
        raise ValueError(f"symile needs at least 2 modalities, got {len(features)}; pass the others in "
                         "LossInputs.extra['modality_features'] (a list of [B, d] tensors)")
    shapes = [tuple(f.shape) for f in features]
    if features[0].ndim != 2 or any(s != shapes[0] for s in shapes):
        raise ValueError(f"symile needs every modality as [B, d] of one shape, got {shapes}")
    if candidates is not None and (len(candidates) != len(features)
                                   or any(c.shape[1:] != features[0].shape[1:] for c in candidates)):
        raise ValueError("symile candidates must hold the same modalities as the features, gathered over processes")


@register("symile")
class SymileLoss(nn.Module):
    """Registered :func:`symile_loss` (options: :class:`SymileConfig`) over image, text and
    ``extra["modality_features"]``: a list of further normalized [B, d] features (audio, a
    third view, ...), modality order image, text, then the list. Local rows against the
    gathered candidates; the mean over processes is the global-batch loss."""

    extra_keys = ("modality_features",)

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(SymileConfig, options, "symile")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        feats = [inputs.image_features, inputs.text_features, *list(inputs.require("modality_features"))]
        cands = [gather(f, inputs.rank, inputs.world_size) for f in feats]
        offset = local_offset(feats[0].shape[0], inputs.rank)
        return {"loss": symile_loss(feats, inputs.logit_scale, self.cfg.negatives, cands, offset, self.cfg.permutation)}
