"""SimCLR NT-Xent on two augmented views: a naive loop from the paper's equation, float64
gradcheck, invariance to permuting the batch and to swapping the views, a hand-computed value,
and the registry entry reading extra["image_features_view2"]."""
import math

import pytest
import torch
from reference.naive_losses import dot, unit

from clipforge import losses
from clipforge.losses import LossInputs, nt_xent

F64 = torch.float64


def naive_nt_xent(v1, v2, tau):
    z = list(v1) + list(v2)
    n, total = len(v1), 0.0
    for k in range(2 * n):
        partner = (k + n) % (2 * n)
        denominator = sum(torch.exp(dot(z[k], z[l]) / tau) for l in range(2 * n) if l != k)
        total = total - torch.log(torch.exp(dot(z[k], z[partner]) / tau) / denominator)
    return total / (2 * n)


def test_matches_naive_and_gradcheck():
    v1, v2 = unit(4, 3, 20), unit(4, 3, 21)
    assert torch.allclose(nt_xent(v1, v2, 0.5), naive_nt_xent(v1, v2, 0.5), atol=1e-12)
    args = (v1.clone().requires_grad_(), v2.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.5), args)


def test_properties():
    v1, v2 = unit(5, 3, 22), unit(5, 3, 23)
    p = torch.tensor([2, 0, 4, 3, 1])
    assert torch.allclose(nt_xent(v1[p], v2[p], 0.5), nt_xent(v1, v2, 0.5))
    assert torch.allclose(nt_xent(v2, v1, 0.5), nt_xent(v1, v2, 0.5))
    # identical orthonormal views: partner at cosine 1, the other 2N - 2 at cosine 0
    e = torch.eye(3, dtype=F64)
    expect = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + 4))
    assert torch.isclose(nt_xent(e, e, 0.5), torch.tensor(expect, dtype=F64))


def test_registry_term():
    v1, v2 = unit(4, 3, 24), unit(4, 3, 25)
    term = losses.build("simclr", temperature=0.2)
    assert term.extra_keys == ("image_features_view2",)
    out = term(LossInputs(v1, unit(4, 3, 26), torch.tensor(1.0), extra={"image_features_view2": v2}))
    assert torch.allclose(out["loss"], nt_xent(v1, v2, 0.2))
    with pytest.raises(KeyError, match="image_features_view2"):
        term(LossInputs(v1, v2, torch.tensor(1.0)))
    with pytest.raises(ValueError, match="image_features_view2"):
        nt_xent(v1, v2[:3])
