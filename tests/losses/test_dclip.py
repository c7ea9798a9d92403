"""DCLIP's hybrid loss: alpha * CLIP + (1 - alpha) * cosine distance to the teacher's embeddings."""
import pytest
import torch
from reference.naive_losses import clip as naive_clip
from reference.naive_losses import dot, unit

from clipforge import losses
from clipforge.losses import LossInputs, clip_loss, cosine_distill_loss, dclip_loss

F64 = torch.float64


def naive_cosine(x, y, ti, tt):
    n = len(x)
    total = 0.0
    for a, b in ((x, ti), (y, tt)):
        for i in range(n):
            cos = dot(a[i], b[i]) / (dot(a[i], a[i]).sqrt() * dot(b[i], b[i]).sqrt())
            total = total + (1 - cos)
    return total / (2 * n)


def test_matches_naive_and_gradcheck():
    x, y, ti, tt = unit(4, 3, 0), unit(4, 3, 1), unit(4, 3, 2) * 2.5, unit(4, 3, 3)  # teacher need not be unit
    assert torch.allclose(cosine_distill_loss(x, y, ti, tt), naive_cosine(x, y, ti, tt))
    expect = 0.3 * naive_clip(x, y, 4.0) + 0.7 * naive_cosine(x, y, ti, tt)
    assert torch.allclose(dclip_loss(x, y, 4.0, ti, tt, alpha=0.3), expect)
    leaves = (x.clone().requires_grad_(), y.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: dclip_loss(a, b, 2.0, ti, tt, 0.5), leaves)


def test_limiting_cases_and_known_values():
    x, y, ti, tt = unit(5, 4, 4), unit(5, 4, 5), unit(5, 4, 6), unit(5, 4, 7)
    assert torch.allclose(dclip_loss(x, y, 4.0, ti, tt, alpha=1.0), clip_loss(x, y, 4.0))
    assert torch.allclose(dclip_loss(x, y, 4.0, ti, tt, alpha=0.0), cosine_distill_loss(x, y, ti, tt))
    assert torch.isclose(cosine_distill_loss(x, y, x, y), torch.tensor(0.0, dtype=F64), atol=1e-12)
    assert torch.isclose(cosine_distill_loss(x, y, -x, -y), torch.tensor(2.0, dtype=F64))  # 1 - cos(pi)
    # an ensemble of teachers averages the cosine terms
    two = cosine_distill_loss(x, y, [ti, x], [tt, y])
    assert torch.allclose(two, 0.5 * cosine_distill_loss(x, y, ti, tt))


def test_registered_term_and_errors():
    x, y, ti, tt = unit(4, 3, 8), unit(4, 3, 9), unit(4, 3, 10), unit(4, 3, 11)
    ex = {"teacher_image_features": ti, "teacher_text_features": tt}
    out = losses.build("dclip", alpha=0.6)(LossInputs(x, y, torch.tensor(4.0, dtype=F64), extra=ex))
    assert torch.allclose(out["loss"], dclip_loss(x, y, 4.0, ti, tt, 0.6))
    assert torch.allclose(out["contrastive"], clip_loss(x, y, 4.0))
    with pytest.raises(ValueError, match="student's size 3"):
        cosine_distill_loss(x, y, unit(4, 5, 0), unit(4, 5, 1))
    with pytest.raises(ValueError, match="alpha"):
        losses.build("dclip", alpha=2.0)
