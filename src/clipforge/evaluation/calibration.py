"""Calibration of zero-shot classifiers ("Toward a Holistic Evaluation of Robustness in CLIP
Models", Sec. on calibration): expected calibration error over equal-width confidence bins,
the reliability diagram's data, and temperature scaling fitted on a validation split by
minimizing the negative log-likelihood (Guo et al., 2017)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reliability(probs: Tensor, labels: Tensor, bins: int = 15) -> dict:
    """Per-bin mean confidence, accuracy and count for confidences in (k/bins, (k+1)/bins]."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    idx = torch.clamp(torch.bucketize(conf.double(), edges, right=False) - 1, 0, bins - 1)
    count = torch.bincount(idx, minlength=bins).double()
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, conf.double())
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, correct)
    safe = count.clamp(min=1)
    return {"edges": edges.tolist(), "confidence": (conf_sum / safe).tolist(), "accuracy": (acc_sum / safe).tolist(),
            "count": count.long().tolist()}


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE = sum_k |B_k|/n |acc(B_k) - conf(B_k)|."""
    r = reliability(probs, labels, bins)
    n = sum(r["count"])
    return float(sum(c / n * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"]) if c))


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimizing the NLL of softmax(logits / T) (optimized in log T with L-BFGS)."""
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    logits, labels = logits.double().detach(), labels.long()
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def calibration_report(val_logits: Tensor, val_labels: Tensor, test_logits: Tensor, test_labels: Tensor,
                       bins: int = 15) -> dict:
    t = fit_temperature(val_logits, val_labels)
    before = test_logits.double().softmax(-1)
    after = (test_logits.double() / t).softmax(-1)
    return {
        "temperature": t,
        "ece": expected_calibration_error(before, test_labels, bins),
        "ece_scaled": expected_calibration_error(after, test_labels, bins),
        "nll": float(F.cross_entropy(test_logits.double(), test_labels.long())),
        "nll_scaled": float(F.cross_entropy(test_logits.double() / t, test_labels.long())),
        "reliability": reliability(before, test_labels, bins),
        "reliability_scaled": reliability(after, test_labels, bins),
    }
