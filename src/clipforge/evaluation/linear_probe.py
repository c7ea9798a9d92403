"""Linear probes on frozen features (Radford et al. 2021, Sec. 3.2): multinomial logistic
regression (scikit-learn's L-BFGS solver) with the inverse regularization C chosen on a
validation split, and k-shot variants that fit on k labelled examples per class."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def k_shot_indices(labels: Sequence[int], k: int, seed: int = 0) -> np.ndarray:
    """k indices per class (all of a class's samples when it has fewer), sampled reproducibly."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
                 max_iter: int = 1000) -> dict:
    """Fit one probe per C on train, keep the best on val, refit on train+val, report test accuracy."""
    from sklearn.linear_model import LogisticRegression

    train_x, val_x, test_x = (np.asarray(a, dtype=np.float64) for a in (train_x, val_x, test_x))
    train_y, val_y, test_y = (np.asarray(a) for a in (train_y, val_y, test_y))
    if len(np.unique(train_y)) < 2:
        raise ValueError("a linear probe needs at least two classes in the training split")
    val_scores = {}
    for c in cs:
        clf = LogisticRegression(C=c, max_iter=max_iter)
        clf.fit(train_x, train_y)
        val_scores[c] = float((clf.predict(val_x) == val_y).mean())
    best = max(cs, key=lambda c: (val_scores[c], -c))  # ties: the stronger regularization
    final = LogisticRegression(C=best, max_iter=max_iter).fit(
        np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
    )
    return {"top1": float((final.predict(test_x) == test_y).mean()), "C": best, "val_top1": val_scores,
            "n_train": int(len(train_y) + len(val_y)), "n_test": int(len(test_y))}
