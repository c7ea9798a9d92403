"""ALIP (consistency gates between raw text, synthetic caption and image; gate-weighted
contrast of both paths) against a naive loop written from the paper and its official code."""
import math

import pytest
import torch
from reference.naive_losses import dot, log_softmax_at, unit

from clipforge import losses
from clipforge.losses import LossInputs, alip_loss, clip_loss
from clipforge.losses.alip import alip_gates

F64 = torch.float64



def naive_gates(x, t, c, mu):
    x, t, c = x.detach(), t.detach(), c.detach()
    ws, wt, wc = [], [], []
    for i in range(len(x)):
        raw_sample = math.exp(2 * (float(dot(t[i], c[i])) - mu[0]))
        if raw_sample >= 1:  # language-consistent sample: all weights 1
            ws.append(1.0), wt.append(1.0), wc.append(1.0)
        else:
            ws.append(raw_sample)
            wt.append(math.exp(2 * (float(dot(x[i], t[i])) - mu[1])))
            wc.append(math.exp(2 * (float(dot(x[i], c[i])) - mu[2])))
    return ws, wt, wc


def naive_alip(x, t, c, s, mu):
    ws, wt, wc = naive_gates(x, t, c, mu)  # floats: the gates carry no gradient
    n = len(x)

    def sym_ce(a, b, i):
        return -0.5 * (log_softmax_at([s * dot(a[i], b[j]) for j in range(n)], i)
                       + log_softmax_at([s * dot(b[i], a[j]) for j in range(n)], i))

    return (sum(ws[i] * wt[i] * sym_ce(x, t, i) for i in range(n)) / n
            + sum(ws[i] * wc[i] * sym_ce(x, c, i) for i in range(n)) / n)


def batch():
    return unit(5, 3, 0), unit(5, 3, 1), unit(5, 3, 2)


def test_matches_naive_values_and_grads():
    mu = [0.1, -0.2, 0.3]
    x, t, c = batch()
    assert torch.allclose(alip_loss(x, t, c, 3.0, torch.tensor(mu)), naive_alip(x, t, c, 3.0, mu))
    # gradients with the gates held constant, in both
    fast = [v.clone().requires_grad_() for v in (x, t, c)]
    slow = [v.clone().requires_grad_() for v in (x, t, c)]
    alip_loss(*fast, 3.0, torch.tensor(mu)).backward()
    naive_alip(*slow, 3.0, mu).backward()
    for a, b in zip(fast, slow):
        assert torch.allclose(a.grad, b.grad, atol=1e-12)


def test_gradcheck_with_fixed_gates():
    x, t, c = batch()
    gates = alip_gates(x, t, c, torch.tensor([0.1, -0.2, 0.3], dtype=F64))
    leaves = tuple(v.clone().requires_grad_() for v in (x, t, c))
    assert torch.autograd.gradcheck(lambda a, b, d: alip_loss(a, b, d, 2.0, torch.zeros(3), gates=gates), leaves)


def test_properties():
    x, t, c = batch()
    # hand-computed gates: t.c one tenth below its average -> w^s = exp(-0.2); pair gates exp(2 (s - mu))
    tc, xt, xc = float(dot(t[0], c[0])), float(dot(x[0], t[0])), float(dot(x[0], c[0]))
    w = alip_gates(x[:1], t[:1], c[:1], torch.tensor([tc + 0.1, xt - 0.3, xc + 0.05], dtype=F64))
    assert math.isclose(float(w.sample), math.exp(-0.2)) and math.isclose(float(w.raw), math.exp(0.6))
    assert math.isclose(float(w.caption), math.exp(-0.1))
    # every sample at least as language-consistent as average: all gates 1, the loss is CLIP on both paths
    low = torch.full((3,), -1.0)
    assert torch.allclose(alip_loss(x, t, c, 3.0, low), clip_loss(x, t, 3.0) + clip_loss(x, c, 3.0))
    # permuting the batch changes nothing
    perm = torch.tensor([4, 2, 0, 1, 3])
    mu = torch.tensor([0.2, 0.0, 0.1])
    assert torch.allclose(alip_loss(x[perm], t[perm], c[perm], 3.0, mu), alip_loss(x, t, c, 3.0, mu))
    # local rows against the gathered batch: the mean over two "processes" is the whole-batch loss
    x4, t4, c4 = unit(4, 3, 3), unit(4, 3, 4), unit(4, 3, 5)
    halves = [alip_loss(x4[2 * r:2 * r + 2], t4[2 * r:2 * r + 2], c4[2 * r:2 * r + 2], 3.0, mu, (x4, t4, c4), 2 * r)
              for r in range(2)]
    assert torch.allclose(sum(halves) / 2, alip_loss(x4, t4, c4, 3.0, mu))


def test_module_running_averages_and_errors():
    x, t, c = batch()
    li = LossInputs(x, t, torch.tensor(3.0, dtype=F64), extra={"synthetic_text_features": c})
    term = losses.build("alip", momentum=0.9)
    out = term(li)["loss"]
    batch_means = torch.stack([(t * c).sum(-1).mean(), (x * t).sum(-1).mean(), (x * c).sum(-1).mean()])
    expect_means = 0.9 * 1.0 + 0.1 * batch_means  # updated from the start value 1 before the gates are taken
    assert torch.allclose(term.means.double(), expect_means, atol=1e-6)
    assert torch.allclose(out, alip_loss(x, t, c, 3.0, term.means))
    assert "means" in term.state_dict()
    term.eval()
    before = term.means.clone()
    term(li)
    assert torch.equal(term.means, before)  # evaluation does not move the averages
    with pytest.raises(KeyError, match="synthetic_text_features"):
        term(LossInputs(x, t, torch.tensor(1.0)))
    with pytest.raises(ValueError, match="one shape"):
        alip_loss(x, t, c[:3], 3.0, torch.zeros(3))
    with pytest.raises(ValueError, match="momentum"):
        losses.build("alip", momentum=1.0)
