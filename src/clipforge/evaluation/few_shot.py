"""Training-free few-shot adaptation on frozen CLIP features.

- :func:`gda_logits`: Gaussian discriminant analysis, "A Hard-to-Beat Baseline for
  Training-free CLIP-based Adaptation" (Wang et al., ICLR 2024). Class means mu_c and one
  shared covariance Sigma (shrunk toward a scaled identity) from the support set give a
  linear classifier w_c = Sigma^-1 mu_c, b_c = -1/2 mu_c^T Sigma^-1 mu_c + log pi_c; it is
  ensembled with the zero-shot classifier: logits = zs + alpha * gda.
- :func:`tip_adapter_logits`: the key-value cache of Tip-Adapter (Zhang et al., ECCV 2022):
  keys are the support features F, values their one-hot labels L; an image x reads
  A = exp(-beta (1 - x Fᵀ)) and adds alpha * A L to the zero-shot logits.
- CapS-Adapter (Wang et al., 2024) builds the support set from captions instead of images:
  :func:`tip_adapter_logits` with the text embeddings of class captions as keys
  (``caps_adapter_logits``) — no labelled image needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gda_classifier(support: Tensor, labels: Tensor, num_classes: int, shrinkage: float = 0.1) -> tuple[Tensor, Tensor]:
    """(W [C, d], b [C]) of the shared-covariance Gaussian classifier fitted on ``support``."""
    x = support.double()
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_classes).double()
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"GDA needs at least one support example of every class; classes {missing} have none")
    mu = torch.zeros(num_classes, x.shape[1], dtype=x.dtype).index_add_(0, labels, x) / counts[:, None]
    centered = x - mu[labels]
    cov = centered.t() @ centered / max(1, x.shape[0] - num_classes)
    d = cov.shape[0]
    spread = torch.trace(cov) / d
    if spread <= 0:  # every support vector equals its class mean (a degenerate embedding): shrink to identity
        spread = torch.ones((), dtype=x.dtype)
    cov = (1 - shrinkage) * cov + shrinkage * spread * torch.eye(d, dtype=x.dtype)
    prec_mu = torch.linalg.solve(cov, mu.t()).t()  # [C, d] = Sigma^-1 mu_c
    prior = counts / counts.sum()
    b = -0.5 * (prec_mu * mu).sum(-1) + prior.log()
    return prec_mu, b


def gda_logits(features: Tensor, support: Tensor, labels: Tensor, num_classes: int, shrinkage: float = 0.1) -> Tensor:
    w, b = gda_classifier(support, labels, num_classes, shrinkage)
    return (features.double() @ w.t() + b).to(features.dtype)


def tip_adapter_logits(features: Tensor, keys: Tensor, key_labels: Tensor, num_classes: int, beta: float = 5.5) -> Tensor:
    """Cache read-out A L with A = exp(-beta (1 - x·k)); add ``alpha`` times this to the zero-shot logits."""
    affinity = torch.exp(-beta * (1 - features @ keys.t()))
    values = F.one_hot(key_labels.long(), num_classes).to(features.dtype)
    return affinity @ values


def caps_adapter_logits(features: Tensor, caption_features: Tensor, caption_labels: Tensor, num_classes: int,
                        beta: float = 5.5) -> Tensor:
    """CapS-Adapter: a Tip-Adapter cache whose keys are caption (text) embeddings of each class."""
    return tip_adapter_logits(features, F.normalize(caption_features, dim=-1), caption_labels, num_classes, beta)


def ensemble(zero_shot_logits: Tensor, adapter_logits: Tensor, alpha: float) -> Tensor:
    return zero_shot_logits + alpha * adapter_logits
