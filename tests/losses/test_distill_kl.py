"""MobileCLIP's ensemble distillation (KL from the teachers' mean similarity distribution)
against a naive reference; teacher layouts ([B, d], [T, B, d], lists of different sizes)."""
import math

import pytest
import torch
from reference.naive_losses import dot, unit

from clipforge import losses
from clipforge.losses import LossInputs, distill_kl_loss, teacher_list

F64 = torch.float64


def softmax(vals):
    m = max(float(v) for v in vals)
    e = [math.exp(float(v) - m) for v in vals]
    return [v / sum(e) for v in e]


def naive(x, y, t, teachers, scales):
    """teachers: list of (image [B, d_k], text [B, d_k]); loops over rows, columns and teachers."""
    n = len(x)
    total = 0.0
    for rows in (True, False):
        for i in range(n):
            p = [0.0] * n
            for (ti, tt), s in zip(teachers, scales):
                logits = [s * float(dot(ti[i], tt[j]) if rows else dot(tt[i], ti[j])) for j in range(n)]
                p = [a + b / len(teachers) for a, b in zip(p, softmax(logits))]
            logits = [t * (dot(x[i], y[j]) if rows else dot(y[i], x[j])) for j in range(n)]
            m = max(float(v) for v in logits)
            logz = m + torch.log(sum(torch.exp(v - m) for v in logits))
            total = total + sum(p[j] * (math.log(p[j]) - (logits[j] - logz)) for j in range(n) if p[j] > 0)
    return total / (2 * n)


def test_matches_naive_for_an_ensemble_of_different_sizes():
    x, y = unit(4, 3, 0), unit(4, 3, 1)
    teachers = [(unit(4, 5, 2), unit(4, 5, 3)), (unit(4, 2, 4), unit(4, 2, 5))]  # d = 5 and d = 2
    got = distill_kl_loss(x, y, 4.0, [a for a, _ in teachers], [b for _, b in teachers], [10.0, 3.0])
    assert torch.allclose(got, naive(x, y, 4.0, teachers, [10.0, 3.0]))
    same = torch.stack([unit(4, 5, 6), unit(4, 5, 7)]), torch.stack([unit(4, 5, 8), unit(4, 5, 9)])
    assert torch.allclose(distill_kl_loss(x, y, 4.0, *same, 10.0), naive(x, y, 4.0, list(zip(*same)), [10.0, 10.0]))


def test_gradcheck_and_mobileclip_cross_entropy_gradients():
    x, y = unit(4, 3, 10), unit(4, 3, 11)
    ti, tt = torch.stack([unit(4, 5, 12), unit(4, 5, 13)]), torch.stack([unit(4, 5, 14), unit(4, 5, 15)])
    leaves = (x.clone().requires_grad_(), y.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: distill_kl_loss(a, b, 3.0, ti, tt, 10.0), leaves)
    # MobileCLIP's code minimizes the cross-entropy with the averaged soft targets: same gradients
    kl = distill_kl_loss(*leaves, 3.0, ti, tt, 10.0)
    g_kl = torch.autograd.grad(kl, leaves)
    p_rows = torch.stack([(10.0 * a @ b.t()).softmax(-1) for a, b in zip(ti, tt)]).mean(0)
    p_cols = torch.stack([(10.0 * b @ a.t()).softmax(-1) for a, b in zip(ti, tt)]).mean(0)
    s = 3.0 * leaves[0] @ leaves[1].t()
    ce = -0.5 * ((p_rows * s.log_softmax(-1)).sum(-1).mean() + (p_cols * s.t().log_softmax(-1)).sum(-1).mean())
    for a, b in zip(g_kl, torch.autograd.grad(ce, leaves)):
        assert torch.allclose(a, b)


def test_properties():
    x, y = unit(5, 4, 16), unit(5, 4, 17)
    ti, tt = unit(5, 6, 18), unit(5, 6, 19)
    # the student equal to its single teacher (same temperature): zero divergence
    assert torch.isclose(distill_kl_loss(x, y, 4.0, x, y, 4.0), torch.tensor(0.0, dtype=F64), atol=1e-12)
    assert distill_kl_loss(x, y, 4.0, ti, tt, 10.0) > 0
    # two copies of one teacher are that teacher
    assert torch.allclose(
        distill_kl_loss(x, y, 4.0, [ti, ti], [tt, tt], 10.0), distill_kl_loss(x, y, 4.0, ti, tt, 10.0)
    )
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(distill_kl_loss(x[perm], y[perm], 4.0, ti[perm], tt[perm], 10.0),
                          distill_kl_loss(x, y, 4.0, ti, tt, 10.0))


def test_registered_term_layouts_and_errors():
    x, y = unit(4, 3, 20), unit(4, 3, 21)
    ti, tt = torch.stack([unit(4, 5, 22), unit(4, 5, 23)]), torch.stack([unit(4, 5, 24), unit(4, 5, 25)])
    scale = torch.tensor(4.0, dtype=F64)
    expect = distill_kl_loss(x, y, 4.0, ti, tt, 10.0)
    term = losses.build("distill_kl", teacher_scale=10.0)
    assert set(term.extra_keys) == {"teacher_image_features", "teacher_text_features"}
    for layout in (lambda t: t, lambda t: list(t.unbind(0))):
        ex = {"teacher_image_features": layout(ti), "teacher_text_features": layout(tt)}
        assert torch.allclose(term(LossInputs(x, y, scale, extra=ex))["loss"], expect)
    ema = losses.build("distill_kl", teacher_scale=10.0, teacher="ema")
    ex = {"ema_image_features": ti[0], "ema_text_features": tt[0]}
    assert torch.allclose(
        ema(LossInputs(x, y, scale, extra=ex))["loss"], distill_kl_loss(x, y, 4.0, ti[0], tt[0], 10.0)
    )
    assert len(teacher_list(ti)) == 2 and len(teacher_list(ti[0])) == 1
    with pytest.raises(KeyError, match="teacher_image_features"):
        term(LossInputs(x, y, scale))
    with pytest.raises(ValueError, match="2 teachers' image features but 1"):
        distill_kl_loss(x, y, 4.0, ti, tt[:1], 10.0)
    with pytest.raises(ValueError, match="one per teacher"):
        distill_kl_loss(x, y, 4.0, ti, tt, [10.0, 5.0, 1.0])
    with pytest.raises(ValueError, match=r"\[T, B, d\]"):
        teacher_list(ti[None])
    with pytest.raises(ValueError, match="key prefix"):
        losses.build("distill_kl", teacher="ema teacher")
