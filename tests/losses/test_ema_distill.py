"""EMA self-distillation of DeGLA: the EMATeacher update and the squared-distance loss."""
import pytest
import torch
from reference.naive_losses import unit

from clipforge import losses
from clipforge.losses import EMATeacher, LossInputs, ema_distill_loss

F64 = torch.float64


def naive(x, y, ex, ey, negs=None, enegs=None, mask=None):
    total = 0.0
    for i in range(len(x)):
        total += sum(float(x[i, k] - ex[i, k]) ** 2 + float(y[i, k] - ey[i, k]) ** 2 for k in range(x.shape[1]))
        if negs is not None:
            for j in range(negs.shape[1]):
                if mask is None or mask[i, j]:
                    total += sum(float(negs[i, j, k] - enegs[i, j, k]) ** 2 for k in range(negs.shape[2]))
    return total / len(x)


def test_matches_naive_and_gradcheck():
    x, y, ex, ey = unit(4, 3, 0), unit(4, 3, 1), unit(4, 3, 2), unit(4, 3, 3)
    negs, enegs = unit(8, 3, 4).reshape(4, 2, 3), unit(8, 3, 5).reshape(4, 2, 3)
    mask = torch.tensor([[True, False], [True, True], [False, False], [True, True]])
    assert abs(float(ema_distill_loss(x, y, ex, ey)) - naive(x, y, ex, ey)) < 1e-12
    got = ema_distill_loss(x, y, ex, ey, negs, enegs, mask)
    assert abs(float(got) - naive(x, y, ex, ey, negs, enegs, mask)) < 1e-12
    leaves = tuple(v.clone().requires_grad_() for v in (x, y, negs))
    assert torch.autograd.gradcheck(lambda a, b, n: ema_distill_loss(a, b, ex, ey, n, enegs, mask), leaves)
    # the teacher is a constant: no gradient reaches its features
    s, t = x.clone().requires_grad_(), ex.clone().requires_grad_()
    ema_distill_loss(s, y, t, ey).backward()
    assert t.grad is None and s.grad is not None


def test_properties():
    x, y = unit(5, 4, 6), unit(5, 4, 7)
    assert float(ema_distill_loss(x, y, x, y)) == 0.0  # student == teacher
    # antipodal unit vectors: ||x - (-x)||^2 = 4 per modality
    assert torch.isclose(ema_distill_loss(x, y, -x, -y), torch.tensor(8.0, dtype=F64))
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(0))
    ex, ey = unit(5, 4, 8), unit(5, 4, 9)
    assert torch.allclose(ema_distill_loss(x[perm], y[perm], ex[perm], ey[perm]), ema_distill_loss(x, y, ex, ey))


def test_ema_teacher_update():
    student = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMATeacher(student, momentum=0.9)
    assert not any(p.requires_grad for p in ema.parameters())
    before = ema.model[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
    student[1].num_batches_tracked += 5
    ema.update(student)
    assert torch.allclose(ema.model[0].weight, 0.9 * before + 0.1 * student[0].weight)
    assert int(ema.model[1].num_batches_tracked) == 5  # integer buffers are copied
    ema.train()
    assert not ema.model.training  # the teacher stays in inference mode
    x = torch.randn(3, 2)
    assert torch.allclose(ema(x), ema.model(x)) and not ema(x).requires_grad
    with pytest.raises(ValueError, match="momentum"):
        EMATeacher(student, momentum=1.0)


def test_registered_term():
    x, y, ex, ey = unit(4, 3, 10), unit(4, 3, 11), unit(4, 3, 12), unit(4, 3, 13)
    negs, enegs = unit(4, 3, 14).reshape(4, 1, 3), unit(4, 3, 15).reshape(4, 1, 3)
    extra = {"ema_image_features": ex, "ema_text_features": ey, "negative_text_features": negs,
             "ema_negative_text_features": enegs}
    plain = losses.build("ema_distill")
    assert set(plain.extra_keys) == {"ema_image_features", "ema_text_features"}
    inputs = LossInputs(x, y, torch.tensor(1.0), extra=extra)
    assert abs(float(plain(inputs)["loss"]) - naive(x, y, ex, ey)) < 1e-12
    with_negs = losses.build("ema_distill", negatives=True)
    assert "ema_negative_text_features" in with_negs.extra_keys
    assert abs(float(with_negs(inputs)["loss"]) - naive(x, y, ex, ey, negs, enegs)) < 1e-12
    with pytest.raises(KeyError, match="ema_image_features"):
        plain(LossInputs(x, y, torch.tensor(1.0)))
    with pytest.raises(ValueError, match="both"):
        ema_distill_loss(x, y, ex, ey, negs, None)
