"""The retrieval-system metrics of clipforge.metrics (record linkage: pairwise precision/recall/F1 and the adjusted
Rand index; image retrieval: mAP@k) against scikit-learn and naive loops written here."""
from __future__ import annotations

import numpy as np
import pytest

from clipforge.metrics import adjusted_rand_index, pairwise_linkage_metrics


def test_linkage_metrics_match_scikit_learn():
    from sklearn.metrics import adjusted_rand_score
    from sklearn.metrics.cluster import pair_confusion_matrix

    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        t, p = rng.integers(0, 6, n), rng.integers(0, 8, n)
        m = pairwise_linkage_metrics(t, p)
        c = pair_confusion_matrix(t, p) / 2  # sklearn counts ordered pairs
        tp, fn, fp = c[1, 1], c[1, 0], c[0, 1]
        assert m["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 1.0)
        assert m["recall"] == pytest.approx(tp / (tp + fn) if tp + fn else 1.0)
        assert adjusted_rand_index(t, p) == pytest.approx(adjusted_rand_score(t, p), abs=1e-12)
    # a hand-computed case: truth {0,1,2},{3,4}; prediction {0,1},{2,3,4}
    m = pairwise_linkage_metrics([0, 0, 0, 1, 1], [5, 5, 6, 6, 6])
    assert (m["correct_pairs"], m["true_pairs"], m["predicted_pairs"]) == (2, 4, 4)
    assert m["f1"] == pytest.approx(0.5)
    assert adjusted_rand_index([0, 0, 1], [1, 1, 0]) == 1.0


def naive_ap_at_k(sims_row, relevant, k):
    ranked = sorted(range(len(sims_row)), key=lambda j: -sims_row[j])[:k]
    hits, total = 0, 0.0
    for i, j in enumerate(ranked, 1):
        if relevant[j]:
            hits += 1
            total += hits / i
    return total / min(sum(relevant), k)


def test_map_at_k_matches_a_naive_loop_and_scikit_learn_at_full_depth():
    from sklearn.metrics import average_precision_score

    from clipforge.metrics import map_at_k

    rng = np.random.default_rng(4)
    x = rng.normal(size=(24, 5))
    groups = rng.integers(0, 6, 24)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn @ xn.T
    for k in (1, 5, 10, 23):
        aps = []
        for i in range(24):
            others = [j for j in range(24) if j != i]
            rel = [groups[j] == groups[i] for j in others]
            if any(rel):
                aps.append(naive_ap_at_k([sims[i, j] for j in others], rel, k))
        assert map_at_k(x, groups, k) == pytest.approx(np.mean(aps))
    # at full depth AP@k is the average precision scikit-learn computes from the scores
    ref = []
    for i in range(24):
        others = [j for j in range(24) if j != i]
        rel = [groups[j] == groups[i] for j in others]
        if any(rel):
            ref.append(average_precision_score(rel, [sims[i, j] for j in others]))
    assert map_at_k(x, groups, 23) == pytest.approx(np.mean(ref))
    assert map_at_k(np.eye(4)[[0, 0, 1, 1]], [0, 0, 1, 1], k=1) == 1.0
