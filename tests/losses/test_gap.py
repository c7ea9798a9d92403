"""Uniformity and alignment ("It's Not a Modality Gap"): naive loops over the joint set and the
positive pairs, float64 gradcheck, limiting cases, and their composition with CLIP through
the registry (``{clip: 1, uniformity: 0.1, alignment: 0.1}``)."""
import math

import pytest
import torch
from reference.naive_losses import unit

from clipforge import losses
from clipforge.losses import LossInputs, alignment_loss, clip_loss, uniformity_loss

F64 = torch.float64


def sq_dist(a, b):
    return sum((a[k] - b[k]) ** 2 for k in range(len(a)))


def naive_uniformity(x, y, t):
    """log of the mean of exp(-t ||u - v||²) over ordered pairs u != v of the joint set."""
    z = list(x) + list(y)
    values = [torch.exp(-t * sq_dist(z[a], z[b])) for a in range(len(z)) for b in range(len(z)) if a != b]
    return torch.log(sum(values) / len(values))


def naive_alignment(x, y, alpha):
    return sum(sq_dist(x[i], y[i]) ** (alpha / 2) for i in range(len(x))) / len(x)


def test_matches_naive():
    x, y = unit(4, 3, 0), unit(4, 3, 1)
    assert torch.allclose(uniformity_loss(x, y, 2.0), naive_uniformity(x, y, 2.0), atol=1e-12)
    assert torch.allclose(uniformity_loss(x, y, 0.5), naive_uniformity(x, y, 0.5), atol=1e-12)
    assert torch.allclose(alignment_loss(x, y), naive_alignment(x, y, 2.0), atol=1e-12)
    assert torch.allclose(alignment_loss(x, y, 1.0), naive_alignment(x, y, 1.0), atol=1e-12)


def test_gradcheck_float64():
    x, y = unit(4, 3, 2).requires_grad_(), unit(4, 3, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: uniformity_loss(a, b, 2.0), (x, y))
    assert torch.autograd.gradcheck(alignment_loss, (x, y))
    # smooth even where embeddings coincide (the squared distance has no square root)
    twin = unit(4, 3, 4)
    assert torch.autograd.gradcheck(lambda a: uniformity_loss(a, twin, 2.0), (twin.clone().requires_grad_(),))


def test_limiting_cases():
    point = unit(1, 3, 5).expand(4, 3)
    assert torch.isclose(uniformity_loss(point, point), torch.tensor(0.0, dtype=F64))  # collapsed: log 1, its maximum
    assert torch.isclose(alignment_loss(point, point), torch.tensor(0.0, dtype=F64))
    # antipodal pairs are at squared distance 4: alignment 4, and uniformity is invariant to permuting the batch
    x = unit(5, 3, 6)
    assert torch.isclose(alignment_loss(x, -x), torch.tensor(4.0, dtype=F64))
    p = torch.tensor([4, 2, 0, 3, 1])
    assert torch.allclose(uniformity_loss(x[p], -x), uniformity_loss(x, -x))


def test_composite_with_clip():
    x, y = unit(6, 4, 7), unit(6, 4, 8)
    inputs = LossInputs(x, y, torch.tensor(3.0, dtype=F64))
    out = losses.build_composite({"clip": 1.0, "uniformity": 0.1})(inputs)
    assert torch.allclose(out["loss"], clip_loss(x, y, 3.0) + 0.1 * uniformity_loss(x, y))
    out = losses.build_composite({"clip": 1.0, "uniformity": {"weight": 0.1, "t": 1.0}, "alignment": 0.2})(inputs)
    expect = clip_loss(x, y, 3.0) + 0.1 * uniformity_loss(x, y, 1.0) + 0.2 * alignment_loss(x, y)
    assert torch.allclose(out["loss"], expect)
    assert {"clip", "uniformity", "alignment"} <= set(out)  # every part is logged


def test_bad_options():
    with pytest.raises(ValueError, match="t must be positive"):
        losses.build("uniformity", t=-1.0)
    with pytest.raises(ValueError, match="one shape"):
        uniformity_loss(unit(3, 4, 9), unit(4, 4, 9))
    assert math.isfinite(float(uniformity_loss(unit(1, 3, 10), unit(1, 3, 11))))  # B = 1 still has the pair (x, y)
