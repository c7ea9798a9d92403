"""SigLIP sigmoid loss (dense): the public contract (sum over all B x B pairs of
-log σ(z_ij (t x_i·y_j + b)) divided by B) as a naive loop, float64 gradcheck including the
bias, properties and the registry entry."""
import math

import pytest
import torch
from reference.naive_losses import siglip, unit

from clipforge import losses
from clipforge.losses import LossInputs, siglip_loss

F64 = torch.float64


def test_matches_contract():
    x, y = unit(5, 4, 0), unit(5, 4, 1)
    t, b = torch.tensor(10.0, dtype=F64), torch.tensor(-3.0, dtype=F64)
    assert torch.allclose(siglip_loss(x, y, t, b), siglip(x, y, t, b), atol=1e-12)


def test_gradcheck_float64():
    x, y = unit(5, 3, 2).requires_grad_(), unit(5, 3, 3).requires_grad_()
    t = torch.tensor(4.0, dtype=F64, requires_grad=True)
    b = torch.tensor(-2.0, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(siglip_loss, (x, y, t, b))


def test_gradients_match_naive():
    x, y = unit(4, 3, 4).requires_grad_(), unit(4, 3, 5).requires_grad_()
    b = torch.tensor(-1.5, dtype=F64, requires_grad=True)
    ours = torch.autograd.grad(siglip_loss(x, y, 6.0, b), (x, y, b))
    theirs = torch.autograd.grad(siglip(x, y, 6.0, b), (x, y, b))
    for a, c in zip(ours, theirs):
        assert torch.allclose(a, c, atol=1e-12)


def test_known_value():
    """x_i = y_i = e_i, b = 0: per row -log σ(t) for the positive and 3 log 2 for the negatives (logit 0)."""
    x = torch.eye(4, dtype=F64)
    expect = math.log1p(math.exp(-5.0)) + 3 * math.log(2.0)
    assert torch.isclose(siglip_loss(x, x, 5.0, 0.0), torch.tensor(expect, dtype=F64))


def test_permutation_invariance():
    x, y = unit(8, 4, 6), unit(8, 4, 7)
    p = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(siglip_loss(x[p], y[p], 3.0, -1.0), siglip_loss(x, y, 3.0, -1.0))


def test_registry_term_and_missing_bias():
    x, y = unit(6, 4, 8), unit(6, 4, 9)
    inputs = LossInputs(x, y, torch.tensor(5.0, dtype=F64), torch.tensor(-2.0, dtype=F64))
    assert torch.allclose(losses.build("siglip")(inputs)["loss"], siglip_loss(x, y, 5.0, -2.0))
    with pytest.raises(KeyError, match="logit_bias"):
        losses.build("siglip")(LossInputs(x, y, torch.tensor(5.0)))
    with pytest.raises(ValueError, match=r"one shape \[B, d\]"):
        siglip_loss(x, y[:, :3], 1.0, 0.0)
