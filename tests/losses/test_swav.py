"""SwAV across image and text (SwALIP): the Sinkhorn-Knopp iterations written out by hand in
float64 loops, the swapped-prediction cross-entropy as a naive double loop, float64 gradcheck
(the codes carry no gradient), the equipartition the codes satisfy, and the registry term."""
import math

import pytest
import torch
from reference.naive_losses import unit

from clipforge import losses
from clipforge.losses import LossInputs, sinkhorn_codes, swapped_prediction, swav_loss

F64 = torch.float64


def naive_sinkhorn(scores, eps, iters):
    b, k = len(scores), len(scores[0])
    q = [[math.exp(float(scores[i][j]) / eps) for i in range(b)] for j in range(k)]  # [K][B]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        q = [[v / sum(row) / k for v in row] for row in q]
        cols = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / cols[i] / b for i in range(b)] for j in range(k)]
    return [[q[j][i] * b for j in range(k)] for i in range(b)]  # [B][K]


def naive_swav(si, st, tau, eps, iters):
    qi, qt = naive_sinkhorn(si, eps, iters), naive_sinkhorn(st, eps, iters)
    b, k = len(si), len(si[0])

    def log_softmax(row, j):
        m = max(float(v) for v in row)
        return row[j] / tau - (m / tau + torch.log(sum(torch.exp((v - m) / tau) for v in row)))

    ce_i = -sum(qt[n][j] * log_softmax(si[n], j) for n in range(b) for j in range(k)) / b
    ce_t = -sum(qi[n][j] * log_softmax(st[n], j) for n in range(b) for j in range(k)) / b
    return 0.5 * (ce_i + ce_t)


def test_sinkhorn_matches_hand_iterations_and_equipartitions():
    s = unit(6, 4, 1) @ unit(5, 4, 2).t()
    q = sinkhorn_codes(s, 0.3, 4)
    assert torch.allclose(q, torch.tensor(naive_sinkhorn(s, 0.3, 4), dtype=F64), atol=1e-12)
    assert torch.allclose(q.sum(1), torch.ones(6, dtype=F64))  # each sample's codes sum to 1
    many = sinkhorn_codes(s, 0.3, 200)  # converged: every prototype gets B / K of the mass
    assert torch.allclose(many.sum(0), torch.full((5,), 6 / 5, dtype=F64), atol=1e-6)


def test_loss_matches_naive_and_gradcheck():
    si, st = unit(6, 4, 3) @ unit(5, 4, 4).t(), unit(6, 4, 5) @ unit(5, 4, 4).t()
    assert torch.allclose(swav_loss(si, st, 0.5, 0.3, 3), naive_swav(si, st, 0.5, 0.3, 3), atol=1e-12)
    # the codes are targets without gradient: the gradient is that of the cross-entropy at fixed codes
    qi, qt = sinkhorn_codes(si, 0.3, 3), sinkhorn_codes(st, 0.3, 3)
    args = (si.clone().requires_grad_(), st.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: swapped_prediction(a, b, qi, qt, 0.5), args)
    a, b = args
    swav_loss(a, b, 0.5, 0.3, 3).backward()
    a2, b2 = si.clone().requires_grad_(), st.clone().requires_grad_()
    swapped_prediction(a2, b2, qi, qt, 0.5).backward()
    assert torch.allclose(a.grad, a2.grad) and torch.allclose(b.grad, b2.grad)


def test_registry_term_scores_normalized_prototypes():
    x, y = unit(6, 4, 6), unit(6, 4, 7)
    term = losses.build("swav", embed_dim=4, num_prototypes=5, temperature=0.5, epsilon=0.3)
    c = torch.nn.functional.normalize(term.prototypes.detach().to(F64), dim=-1)
    got = term(LossInputs(x, y, torch.tensor(1.0)))["loss"]
    assert torch.allclose(got, naive_swav(x @ c.t(), y @ c.t(), 0.5, 0.3, 3), atol=1e-6)
    got.backward()
    assert term.prototypes.grad is not None and term.prototypes.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="embed_dim=4"):
        losses.build("swav", embed_dim=8)(LossInputs(x, y, torch.tensor(1.0)))
    with pytest.raises(ValueError, match="num_prototypes"):
        losses.build("swav", num_prototypes=1)
