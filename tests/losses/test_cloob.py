"""CLOOB: Hopfield retrieval and InfoLOOB as naive loops from the paper's equations, float64
gradcheck, batch-permutation invariance, a limiting case of the retrieval and the registry."""
import pytest
import torch
from reference.naive_losses import dot, unit

from clipforge import losses
from clipforge.losses import LossInputs, cloob_loss
from clipforge.losses.cloob import hopfield_retrieve

F64 = torch.float64


def naive_retrieve(queries, store, beta):
    """normalize( sum_k softmax_k(beta q·K_k) K_k ) for each query."""
    out = []
    for q in queries:
        weights = [torch.exp(beta * dot(q, s)) for s in store]
        v = sum(w * s for w, s in zip(weights, store)) / sum(weights)
        out.append(v / v.norm())
    return torch.stack(out)


def naive_loob(a, b, tau):
    """-1/N sum_i log( exp(a_i·b_i/tau) / sum_{j != i} exp(a_i·b_j/tau) )."""
    n = len(a)
    total = 0.0
    for i in range(n):
        denominator = sum(torch.exp(dot(a[i], b[j]) / tau) for j in range(n) if j != i)
        total = total - torch.log(torch.exp(dot(a[i], b[i]) / tau) / denominator)
    return total / n


def naive_cloob(x, y, tau, beta):
    u_x, u_y = naive_retrieve(x, x, beta), naive_retrieve(y, x, beta)
    v_x, v_y = naive_retrieve(x, y, beta), naive_retrieve(y, y, beta)
    return tau * (naive_loob(u_x, u_y, tau) + naive_loob(v_y, v_x, tau))


def test_matches_naive():
    x, y = unit(5, 3, 3), unit(5, 3, 4)
    assert torch.allclose(cloob_loss(x, y, 1 / 30, 8.0), naive_cloob(x, y, 1 / 30, 8.0), atol=1e-12)
    assert torch.allclose(cloob_loss(x, y, 0.2, 3.0), naive_cloob(x, y, 0.2, 3.0), atol=1e-12)


def test_gradcheck_float64():
    x, y = unit(5, 3, 5).requires_grad_(), unit(5, 3, 6).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: cloob_loss(a, b, 0.2, 3.0), (x, y))


def test_permutation_invariance():
    x, y = unit(6, 4, 7), unit(6, 4, 8)
    p = torch.tensor([3, 1, 4, 0, 5, 2])
    assert torch.allclose(cloob_loss(x[p], y[p]), cloob_loss(x, y))


def test_retrieval_limits():
    """beta -> 0 retrieves the normalized mean of the store; a large beta retrieves the nearest pattern."""
    q, store = unit(4, 3, 9), unit(6, 3, 10)
    mean = store.mean(0) / store.mean(0).norm()
    assert torch.allclose(hopfield_retrieve(q, store, 1e-9), mean.expand(4, 3), atol=1e-6)
    nearest = store[(q @ store.t()).argmax(1)]
    assert torch.allclose(hopfield_retrieve(q, store, 1e4), nearest, atol=1e-6)


def test_registry_and_errors():
    x, y = unit(5, 3, 11), unit(5, 3, 12)
    out = losses.build("cloob", tau=0.1, beta=5.0)(LossInputs(x, y, torch.tensor(1.0)))
    assert torch.allclose(out["loss"], cloob_loss(x, y, 0.1, 5.0))
    with pytest.raises(ValueError, match="at least 2"):
        cloob_loss(x[:1], y[:1])
    with pytest.raises(ValueError, match="positive"):
        losses.build("cloob", beta=0.0)
