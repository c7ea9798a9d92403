"""RaFA (CLIP-Refine): the distance of both features of a pair to a shared random reference as
a naive loop, float64 gradcheck, limiting case (features on the reference give 0), the prior
of the draws, reproducibility from torch's RNG, and the registry entry."""
import pytest
import torch
from reference.naive_losses import unit

from clipforge import losses
from clipforge.losses import LossInputs, rafa_loss
from clipforge.losses.rafa import RafaConfig, sample_reference

F64 = torch.float64


def naive_rafa(x, y, r, r_text=None):
    r_text = r if r_text is None else r_text
    total = 0.0
    for i in range(len(x)):
        total = total + 0.5 * (sum((x[i][k] - r[i][k]) ** 2 for k in range(len(r[i])))
                               + sum((y[i][k] - r_text[i][k]) ** 2 for k in range(len(r[i]))))
    return total / len(x)


def test_matches_naive_and_gradcheck():
    x, y, r, r2 = unit(4, 3, 13), unit(4, 3, 14), torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    assert torch.allclose(rafa_loss(x, y, r), naive_rafa(x, y, r), atol=1e-12)
    assert torch.allclose(rafa_loss(x, y, r, r2), naive_rafa(x, y, r, r2), atol=1e-12)
    args = (x.clone().requires_grad_(), y.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: rafa_loss(a, b, r), args)


def test_limiting_case_and_permutation():
    r = unit(4, 3, 15)
    assert torch.isclose(rafa_loss(r, r, r), torch.tensor(0.0, dtype=F64))
    x, y = unit(4, 3, 16), unit(4, 3, 17)
    p = torch.tensor([1, 3, 0, 2])
    assert torch.allclose(rafa_loss(x[p], y[p], r[p]), rafa_loss(x, y, r))


def test_prior():
    like = torch.zeros(20000, 8, dtype=F64)
    g = torch.Generator().manual_seed(0)
    r = sample_reference(like, RafaConfig(mean=0.5, std=2.0), g)
    assert abs(float(r.mean()) - 0.5) < 0.05 and abs(float(r.std()) - 2.0) < 0.05
    unit_r = sample_reference(like, RafaConfig(normalize=True), g)
    assert torch.allclose(unit_r.norm(dim=-1), torch.ones(20000, dtype=F64))


def test_registry_term():
    x, y = unit(4, 3, 18), unit(4, 3, 19)
    inputs = LossInputs(x, y, torch.tensor(1.0))
    term = losses.build("rafa")
    torch.manual_seed(0)
    a = term(inputs)["loss"]
    torch.manual_seed(0)
    expect = naive_rafa(x, y, torch.randn(4, 3, dtype=F64))  # the paper's prior N(0, I), one draw shared by the pair
    assert torch.allclose(a, expect, atol=1e-12)
    torch.manual_seed(0)
    separate = losses.build("rafa", shared=False)(inputs)["loss"]
    torch.manual_seed(0)
    r_img, r_txt = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    assert torch.allclose(separate, naive_rafa(x, y, r_img, r_txt), atol=1e-12)
    given = unit(4, 3, 20)
    out = term(LossInputs(x, y, torch.tensor(1.0), extra={"rafa_reference": given}))["loss"]
    assert torch.allclose(out, naive_rafa(x, y, given))
    with pytest.raises(ValueError, match="must match the features' shape"):
        rafa_loss(x, y, given[:2])
    with pytest.raises(ValueError, match="std must be positive"):
        losses.build("rafa", std=0.0)
