"""CLIP InfoNCE (dense): a naive loop reference from the paper's equation, float64 gradcheck,
properties (batch permutation, a hand-computed value), the registry entry and input errors."""
import math

import pytest
import torch
from reference.naive_losses import dot, unit

from clipforge import losses
from clipforge.losses import LossInputs, clip_loss

F64 = torch.float64


def naive_clip(x, y, t, eps=0.0):
    """1/2 [image->text + text->image] cross-entropy, target (1 - eps) one-hot + eps / B, by loops."""
    n = len(x)
    total = 0.0
    for a, b in ((x, y), (y, x)):
        for i in range(n):
            scores = [t * dot(a[i], b[j]) for j in range(n)]
            log_z = torch.log(sum(torch.exp(s) for s in scores))
            for j in range(n):
                target = (1 - eps) * (i == j) + eps / n
                total = total - target * (scores[j] - log_z)
    return total / (2 * n)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_naive(eps):
    x, y = unit(5, 4, 0), unit(5, 4, 1)
    t = torch.tensor(3.0, dtype=F64)
    assert torch.allclose(clip_loss(x, y, t, eps), naive_clip(x, y, t, eps), atol=1e-12)


def test_gradcheck_float64():
    x, y = unit(5, 3, 2).requires_grad_(), unit(5, 3, 3).requires_grad_()
    t = torch.tensor(4.0, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: clip_loss(a, b, s, 0.1), (x, y, t))


def test_gradients_match_naive():
    x, y = unit(4, 3, 4).requires_grad_(), unit(4, 3, 5).requires_grad_()
    ours = torch.autograd.grad(clip_loss(x, y, 2.5, 0.2), (x, y))
    theirs = torch.autograd.grad(naive_clip(x, y, 2.5, 0.2), (x, y))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-12)


def test_known_value_orthonormal_pairs():
    """x_i = y_i = e_i: each row has logit t on the positive and 0 elsewhere, so L = log(1 + (B-1) e^{-t})."""
    x = torch.eye(4, dtype=F64)
    assert torch.isclose(clip_loss(x, x, 5.0), torch.tensor(math.log(1 + 3 * math.exp(-5.0)), dtype=F64))


def test_permutation_invariance():
    x, y = unit(8, 4, 6), unit(8, 4, 7)
    p = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(clip_loss(x[p], y[p], 3.0, 0.1), clip_loss(x, y, 3.0, 0.1))


def test_registry_term():
    x, y = unit(6, 4, 8), unit(6, 4, 9)
    inputs = LossInputs(x, y, torch.tensor(5.0, dtype=F64))
    assert "clip" in losses.available()
    assert torch.allclose(losses.build("clip", label_smoothing=0.1)(inputs)["loss"], clip_loss(x, y, 5.0, 0.1))


def test_bad_inputs_are_named():
    x = unit(6, 4, 10)
    with pytest.raises(ValueError, match=r"one shape \[B, d\]"):
        clip_loss(x, x[:5], 1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.build("clip", label_smoothing=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        losses.build("clip", chunk_size=0)
    with pytest.raises(TypeError, match=r"no option\(s\) \['smoothing'\]; its options are"):
        losses.build("clip", smoothing=0.1)


def test_second_image_view_averages_the_two_view_losses():
    """Improved baselines' CLIP loss over a global and one augmented view: (L(x, y) + L(x2, y)) / 2, each
    from the naive loop with label smoothing."""
    x, x2, y = unit(5, 4, 11), unit(5, 4, 12), unit(5, 4, 13)
    term = losses.build("clip", image_view2=True, label_smoothing=0.1)
    assert term.extra_keys == ("image_features_view2",)
    out = term(LossInputs(x, y, torch.tensor(4.0, dtype=F64), extra={"image_features_view2": x2}))
    expect = 0.5 * (naive_clip(x, y, 4.0, 0.1) + naive_clip(x2, y, 4.0, 0.1))
    assert torch.allclose(out["loss"], torch.as_tensor(expect, dtype=F64), atol=1e-12)
    assert losses.build("clip").extra_keys == ()
    with pytest.raises(KeyError, match="image_features_view2"):
        term(LossInputs(x, y, torch.tensor(4.0, dtype=F64)))
