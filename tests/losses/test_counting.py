"""The counting loss of "Teaching CLIP to Count to Ten" against a naive reference."""
import math

import pytest
import torch
from reference.naive_losses import dot, unit

from clipforge import losses
from clipforge.losses import LossInputs, counting_loss

F64 = torch.float64


def naive(x, y, c, t, mask=None):
    terms = []
    for i in range(len(x)):
        if mask is not None and not mask[i]:
            continue
        pos, neg = math.exp(t * float(dot(x[i], y[i]))), math.exp(t * float(dot(x[i], c[i])))
        terms.append(-math.log(pos / (pos + neg)))
    return sum(terms) / len(terms)


def test_matches_naive():
    x, y, c = unit(5, 3, 0), unit(5, 3, 1), unit(5, 3, 2)
    mask = torch.tensor([True, False, True, True, False])
    assert abs(float(counting_loss(x, y, c, 5.0, mask)) - naive(x, y, c, 5.0, mask)) < 1e-12
    assert abs(float(counting_loss(x, y, c, 5.0)) - naive(x, y, c, 5.0)) < 1e-12


def test_gradcheck():
    x, y, c = unit(3, 3, 3), unit(3, 3, 4), unit(3, 3, 5)
    mask = torch.tensor([True, False, True])
    leaves = tuple(v.clone().requires_grad_() for v in (x, y, c))
    assert torch.autograd.gradcheck(lambda a, b, d: counting_loss(a, b, d, 2.0, mask), leaves)


def test_properties():
    x, y, c = unit(4, 3, 6), unit(4, 3, 7), unit(4, 3, 8)
    # true caption == counterfactual: no preference either way, log 2
    assert torch.isclose(counting_loss(x, y, y, 7.0), torch.tensor(math.log(2), dtype=F64))
    # swapping true and counterfactual captions mirrors the margin: L(y, c) + L(c, y) >= 2 log 2 (convexity)
    assert counting_loss(x, y, c, 3.0) + counting_loss(x, c, y, 3.0) >= 2 * math.log(2)
    # unmasked samples do not matter; no counted sample: zero, still differentiable
    mask = torch.tensor([True, False, True, False])
    c2 = c.clone()
    c2[1] = -c2[1]
    assert torch.isclose(counting_loss(x, y, c, 3.0, mask), counting_loss(x, y, c2, 3.0, mask))
    a = x.clone().requires_grad_()
    zero = counting_loss(a, y, c, 3.0, torch.zeros(4, dtype=torch.bool))
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(a.grad, torch.zeros_like(a))


def test_registered_term_and_errors():
    x, y, c = unit(4, 3, 9), unit(4, 3, 10), unit(4, 3, 11)
    mask = torch.tensor([True, True, False, True])
    ex = {"count_negative_text_features": c, "count_mask": mask}
    out = losses.build("counting")(LossInputs(x, y, torch.tensor(4.0, dtype=F64), extra=ex))["loss"]
    assert abs(float(out) - naive(x, y, c, 4.0, mask)) < 1e-12
    # a true-count caption worded like the counterfactual replaces the sample's caption in the pair
    p = unit(4, 3, 12)
    ex["count_positive_text_features"] = p
    out = losses.build("counting")(LossInputs(x, y, torch.tensor(4.0, dtype=F64), extra=ex))["loss"]
    assert abs(float(out) - naive(x, p, c, 4.0, mask)) < 1e-12
    with pytest.raises(KeyError, match="count_negative_text_features"):
        losses.build("counting")(LossInputs(x, y, torch.tensor(4.0)))
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        counting_loss(x, y, c[:2], 4.0)
