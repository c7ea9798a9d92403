"""BYOL across image and text (BYOLIP): a naive per-sample loop of Grill et al.'s eq. 2 in both
directions with the predictor MLP written out by hand, float64 gradcheck, no gradient into the
EMA targets, the predictor-free form, and errors that name the fix."""
import pytest
import torch
from reference.naive_losses import dot, unit

from clipforge import losses
from clipforge.losses import LossInputs, byol_loss

F64 = torch.float64


def naive_predict(p, v):
    hidden = [max(0.0, float(dot(p.w1[h], v) + p.b1[h])) for h in range(p.w1.shape[0])]
    return torch.tensor([sum(p.w2[o][h].item() * hidden[h] for h in range(len(hidden))) + p.b2[o].item()
                         for o in range(p.w2.shape[0])], dtype=F64)


def naive_l(p, t):
    return 2 - 2 * dot(p, t) / (torch.sqrt(dot(p, p)) * torch.sqrt(dot(t, t)))


def test_term_matches_naive_loop():
    x, y, xt, yt = unit(4, 3, 1), unit(4, 3, 2), unit(4, 3, 3), unit(4, 3, 4)
    term = losses.build("byol", embed_dim=3, hidden_dim=5)
    got = term(LossInputs(x, y, torch.tensor(1.0), extra={"ema_image_features": xt, "ema_text_features": yt}))["loss"]
    with torch.no_grad():
        a = sum(naive_l(naive_predict(term.image_predictor, x[i]), yt[i]) for i in range(4)) / 4
        b = sum(naive_l(naive_predict(term.text_predictor, y[i]), xt[i]) for i in range(4)) / 4
    assert torch.allclose(got, 0.5 * (a + b), atol=1e-6)


def test_function_gradcheck_and_targets_get_no_gradient():
    p, q, xt, yt = unit(4, 3, 5), unit(4, 3, 6), unit(4, 3, 7), unit(4, 3, 8)
    args = (p.clone().requires_grad_(), q.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: byol_loss(a, b, xt, yt), args)
    xt, yt, p = xt.clone().requires_grad_(), yt.clone().requires_grad_(), p.clone().requires_grad_()
    byol_loss(p, q, xt, yt).backward()
    assert xt.grad is None and yt.grad is None and p.grad is not None
    # a perfect prediction costs 0, an opposite one 4
    assert torch.isclose(byol_loss(yt.detach(), xt.detach(), xt, yt), torch.tensor(0.0, dtype=F64), atol=1e-12)
    assert torch.isclose(byol_loss(-yt.detach(), -xt.detach(), xt, yt), torch.tensor(4.0, dtype=F64))


def test_without_predictor_and_errors():
    x, y, xt, yt = unit(4, 3, 9), unit(4, 3, 10), unit(4, 3, 11), unit(4, 3, 12)
    term = losses.build("byol", predictor=False)
    assert list(term.parameters()) == []
    extra = {"ema_image_features": xt, "ema_text_features": yt}
    expect = sum(naive_l(x[i], yt[i]) + naive_l(y[i], xt[i]) for i in range(4)) / 8
    assert torch.allclose(term(LossInputs(x, y, torch.tensor(1.0), extra=extra))["loss"], expect)
    with pytest.raises(ValueError, match="embed_dim=3"):
        losses.build("byol", embed_dim=8)(LossInputs(x, y, torch.tensor(1.0), extra=extra))
    with pytest.raises(KeyError, match="ema_image_features"):
        losses.build("byol", embed_dim=3)(LossInputs(x, y, torch.tensor(1.0)))
    with pytest.raises(ValueError, match="embed_dim"):
        losses.build("byol", embed_dim=0)
