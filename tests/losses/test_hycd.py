"""HyCD (hybrid soft labels of CLIP-Refine) against a naive reference; alpha = 0 is CLIP."""
import math

import pytest
import torch
from reference.naive_losses import dot, log_softmax_at, unit

from clipforge import losses
from clipforge.losses import LossInputs, clip_loss, distill_kl_loss, hycd_loss

F64 = torch.float64


def softmax(vals):
    m = max(vals)
    e = [math.exp(v - m) for v in vals]
    return [v / sum(e) for v in e]


def naive(x, y, t, ti, tt, alpha, ts):
    n = len(x)
    total = 0.0
    for rows in (True, False):
        for i in range(n):
            q = softmax([ts * float(dot(ti[i], tt[j]) if rows else dot(tt[i], ti[j])) for j in range(n)])
            s = [t * (dot(x[i], y[j]) if rows else dot(y[i], x[j])) for j in range(n)]
            total = total - sum(((1 - alpha) * (i == j) + alpha * q[j]) * log_softmax_at(s, j) for j in range(n))
    return total / (2 * n)


def test_matches_naive_and_gradcheck():
    x, y, ti, tt = unit(4, 3, 0), unit(4, 3, 1), unit(4, 6, 2), unit(4, 6, 3)
    for alpha in (0.0, 0.3, 1.0):
        assert torch.allclose(hycd_loss(x, y, 4.0, ti, tt, alpha, 10.0), naive(x, y, 4.0, ti, tt, alpha, 10.0))
    leaves = (x.clone().requires_grad_(), y.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: hycd_loss(a, b, 3.0, ti, tt, 0.5, 10.0), leaves)


def test_limiting_cases():
    x, y, ti, tt = unit(5, 4, 4), unit(5, 4, 5), unit(5, 6, 6), unit(5, 6, 7)
    # teacher weight 0: exactly the CLIP loss, whatever the teacher
    assert torch.allclose(hycd_loss(x, y, 4.0, ti, tt, alpha=0.0), clip_loss(x, y, 4.0))
    # teacher weight 1: cross-entropy with the teacher's distribution = its KL plus the teacher's entropy
    rows, cols = (10.0 * ti @ tt.t()).softmax(-1), (10.0 * tt @ ti.t()).softmax(-1)
    entropy = 0.5 * (-(rows * rows.log()).sum(-1).mean() - (cols * cols.log()).sum(-1).mean())
    assert torch.allclose(hycd_loss(x, y, 4.0, ti, tt, 1.0, 10.0), distill_kl_loss(x, y, 4.0, ti, tt, 10.0) + entropy)
    # linear in alpha
    mid = hycd_loss(x, y, 4.0, ti, tt, 0.5, 10.0)
    assert torch.allclose(
        mid, 0.5 * (hycd_loss(x, y, 4.0, ti, tt, 0.0, 10.0) + hycd_loss(x, y, 4.0, ti, tt, 1.0, 10.0))
    )


def test_registered_term_and_errors():
    x, y = unit(4, 3, 8), unit(4, 3, 9)
    ti, tt = torch.stack([unit(4, 5, 10), unit(4, 5, 11)]), torch.stack([unit(4, 5, 12), unit(4, 5, 13)])
    ex = {"teacher_image_features": ti, "teacher_text_features": tt}
    out = losses.build("hycd", alpha=0.4, teacher_scale=10.0)(LossInputs(x, y, torch.tensor(4.0, dtype=F64), extra=ex))
    assert torch.allclose(out["loss"], hycd_loss(x, y, 4.0, ti, tt, 0.4, 10.0))
    with pytest.raises(ValueError, match="alpha"):
        losses.build("hycd", alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        hycd_loss(x, y, 4.0, ti, tt, alpha=-0.1)
