"""Metrics shared by evaluation and adaptation: one implementation each.

- :func:`classification_metrics` and :func:`top1`: top-k, per-class and balanced accuracy with
  tied logits ordered at random in expectation (zero-shot classification, Radford et al., 2021,
  Sec. 3.1.4, scores a degenerate classifier at chance this way).
- Out-of-distribution detection with CLIP:

  - Maximum concept matching, MCM (Ming et al., NeurIPS 2022): the score of an image is the
    maximum over in-distribution classes of softmax_c(x·w_c / tau); in-distribution images
    score high.
  - CLIPN (Wang et al., ICCV 2023): a second, "no" text encoder gives for each class a "no"
    prompt embedding n_c. The probability that the image is *not* class c is
    p_no_c = exp(x·n_c/tau) / (exp(x·n_c/tau) + exp(x·w_c/tau)). With p_c = softmax_c(x·w_c/tau),
    the competing-to-win score is p_c* (1 - p_no_c*) for the predicted class c*, and the
    agreeing-to-differ score is sum_c p_c (1 - p_no_c), the probability that the image is one
    of the known classes and not rejected by that class's "no" prompt. Needs "no" prompts.
  - Metrics: AUROC (in-distribution = positive class) and FPR at 95% TPR.

- Record linkage (CLIPPINGS, :mod:`clipforge.adapt.clippings`): from the contingency table n_ij of true
  entity i and predicted entity j, with row sums a_i and column sums b_j, the record pairs linked in both
  are TP = sum_ij C(n_ij, 2); pairwise precision = TP / sum_j C(b_j, 2), recall = TP / sum_i C(a_i, 2).
  The adjusted Rand index (Hubert and Arabie, 1985) is (TP - E) / ((sum_i C(a_i,2) + sum_j C(b_j,2)) / 2 - E)
  with E = sum_i C(a_i,2) sum_j C(b_j,2) / C(n, 2).

- Image retrieval, mAP@k: for a query with R relevant items and ranked list r_1..r_N,
  AP@k = 1 / min(R, k) * sum_{i <= k} P(i) rel(i), P(i) the precision of the top i; mAP@k is the mean
  over queries (the query itself is excluded from its own ranking).

This module sits below both :mod:`clipforge.adapt` and :mod:`clipforge.evaluation` (the layer
order is in ``tests/test_architecture.py``), so neither has to import the other for a metric.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def classification_metrics(logits: Tensor, labels: Tensor, num_classes: int, topk: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracy, per-class accuracy, balanced accuracy and the confusion matrix.

    Tied logits are ordered at random, in expectation: a sample whose true class shares its
    logit with ``e`` other classes, below ``g`` classes, counts P(hit@k) = clip((k - g)/(e + 1), 0, 1),
    so a degenerate classifier (all logits equal) scores chance, not the accuracy of whichever
    class a sort puts first. Without ties this is the usual 0/1 accuracy. The confusion matrix
    counts each sample's argmax."""
    labels = labels.long()
    n = labels.numel()
    result: dict = {"n": n, "num_classes": num_classes, "chance_top1": 1.0 / num_classes,
                    # the top-1 of always answering the most frequent class: the baseline to beat on unbalanced splits
                    "majority_top1": float(torch.bincount(labels, minlength=num_classes).max()) / n if n else 0.0}
    true = logits.gather(1, labels[:, None])
    greater = (logits > true).sum(1)
    tied = (logits == true).sum(1) - 1
    hits = {k: ((min(k, num_classes) - greater) / (tied + 1)).clamp(0, 1).float() for k in topk}
    for k in topk:
        result[f"top{k}"] = hits[k].mean().item() if n else 0.0
    pred = logits.argmax(dim=1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    support = torch.bincount(labels, minlength=num_classes)
    hit1 = hits[topk[0]] if topk[0] == 1 else ((1 - greater) / (tied + 1)).clamp(0, 1).float()
    per_class_sum = torch.zeros(num_classes).index_add_(0, labels, hit1)
    per_class = torch.where(support > 0, per_class_sum / support.clamp_min(1), torch.full((num_classes,), float("nan")))
    result["per_class_accuracy"] = [None if torch.isnan(v) else v.item() for v in per_class]
    present = per_class[~torch.isnan(per_class)]
    result["balanced_accuracy"] = present.mean().item() if present.numel() else 0.0
    result["confusion_matrix"] = confusion.tolist()
    return result


def top1(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy, tied logits ordered at random in expectation (see :func:`classification_metrics`)."""
    return classification_metrics(logits.detach().float(), labels, logits.shape[1], topk=(1,))["top1"]


def mcm_score(image_features: Tensor, class_embeddings: Tensor, temperature: float = 1.0) -> Tensor:
    return torch.softmax(image_features @ class_embeddings.t() / temperature, dim=-1).max(-1).values


def clipn_scores(image_features: Tensor, class_embeddings: Tensor, no_embeddings: Tensor,
                 temperature: float = 0.01) -> dict[str, Tensor]:
    yes = image_features @ class_embeddings.t() / temperature
    no = image_features @ no_embeddings.t() / temperature
    p = torch.softmax(yes, dim=-1)
    p_no = torch.sigmoid(no - yes)  # exp(no) / (exp(no) + exp(yes))
    pred = p.argmax(-1)
    rows = torch.arange(len(pred))
    return {"ctw": p[rows, pred] * (1 - p_no[rows, pred]), "atd": (p * (1 - p_no)).sum(-1)}


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve with in-distribution as positives (ties count one half)."""
    x, y = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    if len(x) == 0 or len(y) == 0:
        raise ValueError("AUROC needs both in- and out-of-distribution samples")
    greater = (x[:, None] > y[None, :]).sum() + 0.5 * (x[:, None] == y[None, :]).sum()
    return float(greater / (len(x) * len(y)))


def fpr_at_tpr(in_scores, out_scores, tpr: float = 0.95) -> float:
    """Fraction of OOD samples accepted at the threshold that keeps ``tpr`` of the ID samples."""
    x, y = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    threshold = np.sort(x)[int(np.floor((1 - tpr) * len(x)))]
    return float((y >= threshold).mean())


def ood_metrics(in_scores, out_scores) -> dict:
    return {"auroc": auroc(in_scores, out_scores), "fpr95": fpr_at_tpr(in_scores, out_scores),
            "n_in": int(len(in_scores)), "n_out": int(len(out_scores))}


def _pair_counts(true_labels, pred_labels) -> tuple[float, float, float, int]:
    """(pairs linked in both, pairs linked in truth, pairs linked in the prediction, records)."""
    t = np.asarray(true_labels)
    p = np.asarray(pred_labels)
    if t.ndim != 1 or t.shape != p.shape:
        raise ValueError(f"true and predicted labels must be two 1-d sequences of one length, got {t.shape} "
                         f"and {p.shape}")
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    table = np.zeros((ti.max(initial=-1) + 1, pi.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(table, (ti, pi), 1)

    def pairs(x):
        x = x.astype(np.float64)
        return float((x * (x - 1) / 2).sum())

    return pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), int(t.shape[0])


def pairwise_linkage_metrics(true_labels, pred_labels) -> dict:
    """Pairwise precision, recall and F1 of a linkage (entity id per record) against the true entities.

    A prediction that links no pair has precision 1 (nothing wrong was linked); truth without pairs: recall 1."""
    both, truth, pred, _ = _pair_counts(true_labels, pred_labels)
    precision = both / pred if pred else 1.0
    recall = both / truth if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "true_pairs": int(truth), "predicted_pairs": int(pred),
            "correct_pairs": int(both)}


def adjusted_rand_index(true_labels, pred_labels) -> float:
    """The adjusted Rand index of two labellings (1 when identical, about 0 for chance agreement)."""
    both, truth, pred, n = _pair_counts(true_labels, pred_labels)
    total = n * (n - 1) / 2
    if total == 0:
        return 1.0
    expected = truth * pred / total
    top = (truth + pred) / 2
    if top == expected:  # both labellings are all-singletons or one cluster: identical partitions up to naming
        return 1.0
    return float((both - expected) / (top - expected))


def map_at_k(features, groups, k: int = 10) -> float:
    """Mean average precision at ``k`` of image-to-image retrieval: every row of ``features`` [N, d] (compared by
    cosine) queries all the others, the relevant ones being those of its ``groups`` entry (a near-duplicate family or
    an augmentation pair). Queries without another item of their group are skipped."""
    x = torch.as_tensor(features, dtype=torch.float64)
    g = np.asarray(groups)
    if x.ndim != 2 or x.shape[0] != len(g):
        raise ValueError(f"map_at_k needs features [N, d] and N group ids, got {tuple(x.shape)} and {len(g)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = torch.nn.functional.normalize(x, dim=-1)
    sims = (x @ x.t()).numpy()
    np.fill_diagonal(sims, -np.inf)
    aps = []
    for i in range(len(g)):
        relevant = (g == g[i])
        relevant[i] = False
        total = int(relevant.sum())
        if total == 0:
            continue
        order = np.argsort(-sims[i], kind="stable")[:k]
        hits = relevant[order].astype(np.float64)
        precision = np.cumsum(hits) / np.arange(1, len(order) + 1)
        aps.append(float((precision * hits).sum() / min(total, k)))
    if not aps:
        raise ValueError("map_at_k: no query has another item of its group")
    return float(np.mean(aps))
