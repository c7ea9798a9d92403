"""m^2-Mix: slerp geometry, the mixed-negative contrast as a naive loop from the paper's
equation, float64 gradcheck, batch-permutation invariance, the limit where the mixtures are
the images themselves, and the registry entry (lambda from Beta(alpha, alpha) or given)."""
import math

import pytest
import torch
from reference.naive_losses import dot, unit

from clipforge import losses
from clipforge.losses import LossInputs, m2mix_loss, slerp

F64 = torch.float64


def test_slerp_geometry():
    a, b = unit(6, 4, 16), unit(6, 4, 17)
    assert torch.allclose(slerp(a, b, 1.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 0.0), b, atol=1e-6)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid.norm(dim=-1), torch.ones(6, dtype=F64), atol=1e-6)  # stays on the sphere
    assert torch.allclose((mid * a).sum(-1), (mid * b).sum(-1), atol=1e-6)  # equidistant
    lam = torch.tensor([0.2, 0.4, 0.6, 0.8, 0.1, 0.9], dtype=F64)  # one lambda per pair
    angle = torch.acos((slerp(a, b, lam) * b).sum(-1))
    assert torch.allclose(angle, lam * torch.acos((a * b).sum(-1)), atol=1e-6)  # lam of the arc from b


def naive_m2mix(x, y, t, lam, t_mix=None):
    t_mix = t if t_mix is None else t_mix
    n = len(x)
    theta = [math.acos(float(dot(x[j], y[j]))) for j in range(n)]
    mixed = [(math.sin(lam * theta[j]) * x[j] + math.sin((1 - lam) * theta[j]) * y[j]) / math.sin(theta[j])
             for j in range(n)]
    total = 0.0
    for i in range(n):
        for q in (x[i], y[i]):
            positive = torch.exp(t * dot(x[i], y[i]))
            negatives = sum(torch.exp(t_mix * dot(q, mixed[j])) for j in range(n) if j != i)
            total = total - torch.log(positive / (positive + negatives))
    return total / (2 * n)


def test_matches_naive_and_gradcheck():
    x, y = unit(4, 3, 18), unit(4, 3, 19)
    assert torch.allclose(m2mix_loss(x, y, 3.0, 0.3), naive_m2mix(x, y, 3.0, 0.3), atol=1e-12)
    assert torch.allclose(m2mix_loss(x, y, 3.0, 0.7, 5.0), naive_m2mix(x, y, 3.0, 0.7, 5.0), atol=1e-12)
    args = (x.clone().requires_grad_(), y.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: m2mix_loss(a, b, 2.0, 0.4), args)


def test_properties():
    x, y = unit(5, 3, 20), unit(5, 3, 21)
    p = torch.tensor([4, 0, 3, 1, 2])
    assert torch.allclose(m2mix_loss(x[p], y[p], 3.0, 0.3), m2mix_loss(x, y, 3.0, 0.3))
    # lam = 1: the mixtures are the images, so each row contrasts t x_i·y_i against t q_i·x_j (j != i)
    t = 3.0
    positive = t * (x * y).sum(-1, keepdim=True)
    others = torch.eye(5, dtype=torch.bool)
    sides = [torch.cat([positive, (t * q @ x.t()).masked_fill(others, -math.inf)], 1) for q in (x, y)]
    expect = sum((torch.logsumexp(s, 1) - positive[:, 0]).mean() for s in sides) / 2
    assert torch.allclose(m2mix_loss(x, y, t, 1.0), expect, atol=1e-9)


def test_registry_term():
    x, y = unit(4, 3, 22), unit(4, 3, 23)
    given = losses.build("m2mix")(LossInputs(x, y, torch.tensor(3.0, dtype=F64), extra={"m2mix_lambda": 0.3}))
    assert torch.allclose(given["loss"], m2mix_loss(x, y, 3.0, 0.3)) and float(given["lambda"]) == pytest.approx(0.3)
    torch.manual_seed(1)
    drawn = losses.build("m2mix", alpha=0.5, mix_scale=4.0)(LossInputs(x, y, torch.tensor(3.0, dtype=F64)))
    lam = float(drawn["lambda"])
    assert 0.0 < lam < 1.0
    assert torch.allclose(drawn["loss"], m2mix_loss(x, y, 3.0, lam, 4.0), atol=1e-6)
    composite = losses.build_composite({"clip": 1.0, "m2mix": 0.5})
    assert {"clip", "m2mix", "m2mix/lambda"} <= set(composite(LossInputs(x, y, torch.tensor(3.0, dtype=F64))))
    with pytest.raises(ValueError, match="alpha must be positive"):
        losses.build("m2mix", alpha=0.0)
