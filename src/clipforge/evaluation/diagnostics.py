"""Embedding-space diagnostics: the modality gap (Liang et al. 2022; "It's Not a Modality
Gap", Fahim et al. 2024), uniformity and alignment (Wang & Isola 2020), effective rank
(Roy & Vetterli 2007: exp of the entropy of the normalized singular values) and how well a
linear classifier tells image from text embeddings (cross-validated accuracy; 0.5 = the
modalities are indistinguishable)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def modality_gap(image_features: Tensor, text_features: Tensor) -> float:
    """Distance between the centroids of the L2-normalized image and text embeddings."""
    x, y = F.normalize(image_features.double(), dim=-1), F.normalize(text_features.double(), dim=-1)
    return float((x.mean(0) - y.mean(0)).norm())


def uniformity(features: Tensor, t: float = 2.0) -> float:
    z = F.normalize(features.double(), dim=-1)
    n = z.shape[0]
    sq = torch.cdist(z, z).pow(2)[~torch.eye(n, dtype=torch.bool)]
    return float(torch.logsumexp(-t * sq, 0) - np.log(sq.numel()))


def alignment(image_features: Tensor, text_features: Tensor) -> float:
    x, y = F.normalize(image_features.double(), dim=-1), F.normalize(text_features.double(), dim=-1)
    return float((x - y).pow(2).sum(-1).mean())


def effective_rank(features: Tensor) -> float:
    s = torch.linalg.svdvals(features.double() - features.double().mean(0))
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def modality_separability(image_features: Tensor, text_features: Tensor, folds: int = 5, seed: int = 0) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    x = np.concatenate(
        [F.normalize(image_features.double(), dim=-1).numpy(), F.normalize(text_features.double(), dim=-1).numpy()]
    )
    y = np.concatenate([np.zeros(len(image_features)), np.ones(len(text_features))])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    return float(cross_val_score(LogisticRegression(max_iter=1000), x[order], y[order], cv=folds).mean())


def embedding_diagnostics(image_features: Tensor, text_features: Tensor) -> dict:
    """The embedding-space numbers of the suite's ``diagnostics`` task. The modality classifier is cross-validated
    with at most 5 folds and no more folds than either side has samples (a stratified fold needs one of each); with
    fewer than 2 on a side it is None (nothing to cross-validate), as is the uniformity of a single embedding."""
    folds = min(5, len(image_features), len(text_features))
    return {
        "modality_gap": modality_gap(image_features, text_features),
        "uniformity_image": uniformity(image_features) if len(image_features) > 1 else None,  # needs a pair
        "uniformity_text": uniformity(text_features) if len(text_features) > 1 else None,
        "alignment": alignment(image_features, text_features),
        "effective_rank_image": effective_rank(image_features),
        "effective_rank_text": effective_rank(text_features),
        "modality_classifier_accuracy": modality_separability(image_features, text_features, folds=folds)
        if folds >= 2 else None,
    }
