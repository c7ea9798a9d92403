"""Barlow Twins across image and text (BarLIP): a naive double loop over the cross-correlation
matrix from Zbontar et al.'s eq. 1-2, a hand-computed case, float64 gradcheck, and the registry
term with the second image view."""
import math

import pytest
import torch
from reference.naive_losses import unit

from clipforge import losses
from clipforge.losses import LossInputs, barlow_twins_loss


def naive_barlow(a, b, lam, scale, eps=1e-5):
    n, d = a.shape

    def standardized(z, i):
        column = [z[k][i] for k in range(n)]
        mean = sum(column) / n
        var = sum((v - mean) ** 2 for v in column) / n
        return [(v - mean) / torch.sqrt(var + eps) for v in column]

    za, zb = [standardized(a, i) for i in range(d)], [standardized(b, j) for j in range(d)]
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(za[i][k] * zb[j][k] for k in range(n)) / n
            total = total + ((1 - c) ** 2 if i == j else lam * c ** 2)
    return scale * total


def test_matches_naive_and_gradcheck():
    a, b = unit(6, 4, 1), unit(6, 4, 2)
    assert torch.allclose(barlow_twins_loss(a, b, 0.3, 0.5), naive_barlow(a, b, 0.3, 0.5), atol=1e-12)
    args = (a.clone().requires_grad_(), b.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda x, y: barlow_twins_loss(x, y, 0.3, 0.5), args)


def test_hand_computed():
    # two samples, two dims: standardized columns are +-1 (eps=0-ish); identical twins give C = [[1, r], [r, 1]]
    a = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)  # both columns standardize to [1, -1]
    c01 = 1.0  # the two dims are perfectly correlated: off-diagonals are 1, diagonal 1
    got = barlow_twins_loss(a, a, lambda_offdiag=0.1, scale=1.0, eps=1e-12)
    assert math.isclose(got.item(), 0.1 * 2 * c01 ** 2, rel_tol=1e-9)
    b = torch.tensor([[1.0, -3.0], [-1.0, 3.0]], dtype=torch.float64)  # dim 1 anti-correlated with a's
    got = barlow_twins_loss(a, b, lambda_offdiag=0.0, scale=1.0, eps=1e-12)
    assert math.isclose(got.item(), (1 - 1) ** 2 + (1 + 1) ** 2, rel_tol=1e-9)


def test_registry_term_and_errors():
    x, y, v2 = unit(5, 3, 3), unit(5, 3, 4), unit(5, 3, 5)
    term = losses.build("barlow_twins", lambda_offdiag=0.01, scale=1.0)
    assert term.extra_keys == ()
    assert torch.allclose(term(LossInputs(x, y, torch.tensor(1.0)))["loss"], barlow_twins_loss(x, y, 0.01, 1.0))
    two = losses.build("barlow_twins", image_view2=True)
    assert two.extra_keys == ("image_features_view2",)
    out = two(LossInputs(x, y, torch.tensor(1.0), extra={"image_features_view2": v2}))["loss"]
    assert torch.allclose(out, 0.5 * (barlow_twins_loss(x, y) + barlow_twins_loss(v2, y)))
    with pytest.raises(KeyError, match="image_features_view2"):
        two(LossInputs(x, y, torch.tensor(1.0)))
    with pytest.raises(ValueError, match="at least 2"):
        barlow_twins_loss(x[:1], y[:1])
    with pytest.raises(ValueError, match="lambda_offdiag"):
        losses.build("barlow_twins", lambda_offdiag=-1.0)
