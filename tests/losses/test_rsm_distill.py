"""RS-M-CLIP's local/global self-distillation: a naive loop of the DINO-style cross-entropy, float64 gradcheck,
no gradient into the EMA teacher, and errors that name the fix."""
import math

import pytest
import torch
from reference.naive_losses import unit

from clipforge import losses
from clipforge.losses import LossInputs, rsm_distill_loss

F64 = torch.float64


def naive(student, teacher, ts, tt):
    """-1/B sum_i sum_k softmax(t_i/tt)_k log softmax(s_i/ts)_k, written with exp and log per element."""
    total = 0.0
    for i in range(len(student)):
        t_den = sum(math.exp(float(v) / tt) for v in teacher[i])
        s_den = sum(math.exp(float(v) / ts) for v in student[i])
        for k in range(len(student[i])):
            p = math.exp(float(teacher[i][k]) / tt) / t_den
            total -= p * (float(student[i][k]) / ts - math.log(s_den))
    return total / len(student)


def test_term_matches_naive_loop():
    s, t = unit(5, 4, 1), unit(5, 4, 2)
    term = losses.build("rsm_distill", student_temperature=0.2, teacher_temperature=0.05)
    x, y = unit(5, 4, 3), unit(5, 4, 4)  # the contrastive pair, not read by this term
    got = term(LossInputs(x, y, torch.tensor(1.0), extra={"image_features_view2": s, "ema_image_features": t}))["loss"]
    assert float(got) == pytest.approx(naive(s, t, 0.2, 0.05), abs=1e-10)
    assert float(rsm_distill_loss(s, t)) == pytest.approx(naive(s, t, 0.1, 0.04), abs=1e-10)  # the defaults


def test_gradcheck_teacher_gets_no_gradient_and_minimum():
    s, t = unit(3, 4, 5), unit(3, 4, 6)
    assert torch.autograd.gradcheck(lambda a: rsm_distill_loss(a, t), (s.clone().requires_grad_(),))
    t, s = t.clone().requires_grad_(), s.clone().requires_grad_()
    rsm_distill_loss(s, t).backward()
    assert t.grad is None and s.grad is not None
    # at equal temperatures the cross-entropy is smallest (the teacher's entropy) when the student equals the teacher
    same = rsm_distill_loss(t.detach(), t, 0.1, 0.1)
    entropy = -(torch.softmax(t.detach() / 0.1, -1) * torch.log_softmax(t.detach() / 0.1, -1)).sum(-1).mean()
    assert torch.isclose(same, entropy) and rsm_distill_loss(s.detach(), t, 0.1, 0.1) > same


def test_errors_name_the_fix():
    x = unit(4, 3, 7)
    with pytest.raises(KeyError, match="image_features_view2"):
        losses.build("rsm_distill")(LossInputs(x, x, torch.tensor(1.0), extra={"ema_image_features": x}))
    with pytest.raises(ValueError, match="temperatures must be positive"):
        losses.build("rsm_distill", teacher_temperature=0)
    with pytest.raises(TypeError, match="student_temperature"):
        losses.build("rsm_distill", tau=0.1)
    assert losses.build("rsm_distill").extra_keys == ("image_features_view2", "ema_image_features")
