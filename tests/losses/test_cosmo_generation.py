"""COSMO's generation term (clipforge/losses/cosmo.py) against a loop over the valid positions."""
import math

import pytest
import torch

from clipforge import losses
from clipforge.losses.base import LossInputs
from clipforge.losses.cosmo import IGNORE, cosmo_generation_loss


def _naive(logits, targets, eps=0.0):
    total, n = 0.0, 0
    g, t, v = logits.shape
    for i in range(g):
        for j in range(t):
            y = int(targets[i, j])
            if y == IGNORE:
                continue
            row = [float(x) for x in logits[i, j]]
            m = max(row)
            logz = m + math.log(sum(math.exp(x - m) for x in row))
            logp = [x - logz for x in row]
            total += -(1 - eps) * logp[y] - eps / v * sum(logp)
            n += 1
    return total / n


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_generation_loss_matches_a_loop_over_valid_positions(eps):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.tensor([[3, 1, IGNORE, 6, IGNORE], [0, IGNORE, IGNORE, IGNORE, IGNORE]])
    got = cosmo_generation_loss(logits, targets, eps)
    assert abs(float(got) - _naive(logits, targets, eps)) < 1e-5


def test_registered_term_reads_the_model_outputs_and_names_what_is_missing():
    loss = losses.build("cosmo_generation")
    logits = torch.randn(1, 3, 4)
    targets = torch.tensor([[1, 2, IGNORE]])
    feats = torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    inputs = LossInputs(feats, feats, torch.tensor(10.0), extra={"cosmo_logits": logits, "cosmo_targets": targets})
    out = loss(inputs)
    assert abs(float(out["loss"]) - _naive(logits, targets)) < 1e-5
    with pytest.raises(KeyError, match="only a COSMO model returns"):
        loss(LossInputs(feats, feats, torch.tensor(10.0)))
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.build("cosmo_generation", label_smoothing=1.5)
