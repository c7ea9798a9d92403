"""UniME's loss terms (losses/unime_kd.py, losses/unime_hardneg.py) against naive per-query loops written here
from the paper's equations."""
import math

import pytest
import torch
import torch.nn.functional as F

from clipforge import losses
from clipforge.losses import LossInputs, false_negative_mask, hard_negative_indices, unime_hardneg_loss, unime_kd_loss


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def naive_kd(s, t, tau):
    total = 0.0
    for i in range(len(s)):
        zs = [math.exp(float(s[i] @ s[j]) / tau) for j in range(len(s))]
        zt = [math.exp(float(t[i] @ t[j]) / tau) for j in range(len(t))]
        ps, pt = [z / sum(zs) for z in zs], [z / sum(zt) for z in zt]
        total += sum(p * math.log(p / q) for p, q in zip(pt, ps))
    return total / len(s)


def naive_hardneg(q, c, tau, beta, k):
    """Per query: drop the candidates above s_pos + beta, keep the k most similar others, InfoNCE."""
    total = 0.0
    for i in range(len(q)):
        sims = [float(q[i] @ c[j]) for j in range(len(c))]
        alpha = sims[i] + beta
        kept = sorted((sims[j] for j in range(len(c)) if j != i and sims[j] <= alpha), reverse=True)[:k]
        denom = math.exp(sims[i] / tau) + sum(math.exp(s / tau) for s in kept)
        total += -math.log(math.exp(sims[i] / tau) / denom)
    return total / len(q)


def test_kd_matches_the_naive_kl_and_vanishes_when_the_student_is_the_teacher():
    s, t = _unit(6, 5), _unit(6, 9, seed=1)
    assert unime_kd_loss(s, t, 0.1).item() == pytest.approx(naive_kd(s, t, 0.1), rel=1e-9)
    assert unime_kd_loss(t, t, 0.1).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("beta,k", [(0.1, 2), (0.0, 8), (-0.2, 3), (5.0, 1)])
def test_hardneg_matches_the_naive_loop(beta, k):
    q, c = _unit(7, 4), _unit(7, 4, seed=2)
    assert unime_hardneg_loss(q, c, 0.07, beta, k).item() == pytest.approx(naive_hardneg(q, c, 0.07, beta, k),
                                                                             rel=1e-9)


def test_false_negative_filter_and_topk_by_hand():
    sims = torch.tensor([[0.5, 0.9, 0.55, 0.1, 0.3],
                         [0.2, 0.4, 0.45, 0.6, -0.1]])
    pos = torch.tensor([0, 1])
    # query 0: alpha = 0.6, so 0.9 is a false negative; query 1: alpha = 0.5, so 0.6 is one (0.45 stays)
    assert false_negative_mask(sims, pos, 0.1).tolist() == [[False, True, False, False, False],
                                                            [False, False, False, True, False]]
    idx, valid = hard_negative_indices(sims, pos, 0.1, 2)
    assert idx.tolist() == [[2, 4], [2, 0]] and valid.all()
    idx, valid = hard_negative_indices(sims, pos, -1.0, 3)  # everything above s_pos - 1 is filtered: none left
    assert not valid.any()


def test_hardneg_with_nothing_left_is_zero_and_with_all_negatives_is_infonce():
    q, c = _unit(5, 3), _unit(5, 3, seed=3)
    assert unime_hardneg_loss(q, c, 0.1, beta=-3.0, k=4).item() == pytest.approx(0.0, abs=1e-12)
    full = F.cross_entropy(q @ c.t() / 0.1, torch.arange(5))
    assert unime_hardneg_loss(q, c, 0.1, beta=3.0, k=4).item() == pytest.approx(full.item(), rel=1e-9)


def test_registered_terms_symmetric_and_teacher_inputs():
    x, y, t = _unit(4, 3), _unit(4, 3, seed=4), _unit(4, 6, seed=5)
    li = LossInputs(x, y, torch.tensor(1.0), extra={"teacher_text_features": 3 * t})  # teacher normalized inside
    hn = losses.build("unime_hardneg", temperature=0.1, beta=0.05, k=2)(li)
    expect = 0.5 * (naive_hardneg(x, y, 0.1, 0.05, 2) + naive_hardneg(y, x, 0.1, 0.05, 2))
    assert hn["loss"].item() == pytest.approx(expect, rel=1e-9)
    assert losses.build("unime_kd", temperature=0.2)(li)["loss"].item() == pytest.approx(naive_kd(y, t, 0.2), rel=1e-9)
    with pytest.raises(TypeError, match="no option"):
        losses.build("unime_hardneg", margin=0.1)
    with pytest.raises(ValueError, match="temperature"):
        losses.build("unime_kd", temperature=0.0)
