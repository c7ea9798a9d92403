"""GDA: Gaussian discriminant analysis on frozen CLIP features, training-free.

"A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation" (Wang et al., ICLR 2024).
Class means mu_c and one shared covariance Sigma (shrunk toward a scaled identity) from the
support set give the paper's linear classifier (Bayes' rule for Gaussians that share
Sigma):

    w_c = Sigma^-1 mu_c,   b_c = -1/2 mu_c^T Sigma^-1 mu_c + log pi_c,

ensembled with the zero-shot classifier: logits = zs + alpha * (x w_cᵀ + b_c), alpha chosen on
a validation split.
"""
from __future__ import annotations

import torch
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
    """The GDA classifier's logits x W^T + b for ``features`` [N, d]."""
    w, b = gda_classifier(support, labels, num_classes, shrinkage)
    return (features.double() @ w.t() + b).to(features.dtype)
