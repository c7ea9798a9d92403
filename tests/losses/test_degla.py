"""DeGLA's image-grounded (IGC) and text-grounded (TGC) contrast against naive references."""
import math

import pytest
import torch
from reference.naive_losses import dot, log_softmax_at, unit

from clipforge import losses
from clipforge.losses import LossInputs, grounded_contrast

F64 = torch.float64


def naive(anchor, positive, negs, s, mask=None):
    total = 0.0
    for i in range(len(anchor)):
        scores = [s * dot(anchor[i], positive[i])]
        scores += [s * dot(anchor[i], negs[i, k]) for k in range(negs.shape[1]) if mask is None or mask[i, k]]
        total = total - log_softmax_at(scores, 0)
    return total / len(anchor)


def test_matches_naive_and_gradcheck():
    a, p = unit(4, 3, 0), unit(4, 3, 1)
    negs = unit(12, 3, 2).reshape(4, 3, 3)
    mask = torch.tensor([[True, True, False], [False, False, False], [True, True, True], [False, True, False]])
    assert torch.allclose(grounded_contrast(a, p, negs, 4.0, mask), naive(a, p, negs, 4.0, mask))
    assert torch.allclose(grounded_contrast(a, p, negs, 4.0), naive(a, p, negs, 4.0))
    leaves = tuple(v.clone().requires_grad_() for v in (a, p, negs)) + (
        torch.tensor(2.0, dtype=F64, requires_grad=True),
    )
    # the learned scale gets a finite gradient even where a sample's negatives are all masked out
    assert torch.autograd.gradcheck(lambda u, v, w, t: grounded_contrast(u, v, w, t, mask), leaves)


def test_properties():
    a, p = unit(5, 4, 3), unit(5, 4, 4)
    negs = unit(10, 4, 5).reshape(5, 2, 4)
    # one negative identical to the positive: a coin flip, log 2
    assert torch.isclose(grounded_contrast(a, p, p[:, None], 5.0), torch.tensor(math.log(2), dtype=F64))
    # every negative masked out: nothing to contrast, zero loss
    assert float(grounded_contrast(a, p, negs, 5.0, torch.zeros(5, 2, dtype=torch.bool))) == 0.0
    # per-sample contrast: permuting samples or the order of a sample's negatives changes nothing
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(grounded_contrast(a[perm], p[perm], negs[perm], 5.0), grounded_contrast(a, p, negs, 5.0))
    assert torch.allclose(grounded_contrast(a, p, negs.flip(1), 5.0), grounded_contrast(a, p, negs, 5.0))


def test_registered_terms():
    x, y, ema = unit(4, 3, 6), unit(4, 3, 7), unit(4, 3, 8)
    negs, mask = unit(8, 3, 9).reshape(4, 2, 3), torch.tensor([[True, False], [True, True]] * 2)
    ex = {"negative_text_features": negs, "negative_text_mask": mask, "ema_text_features": ema}
    inputs = LossInputs(x, y, torch.tensor(3.0, dtype=F64), extra=ex)
    # IGC: the image prefers its caption over its negatives, with the learned scale
    assert torch.allclose(losses.build("degla_igc")(inputs)["loss"], naive(x, y, negs, 3.0, mask))
    assert torch.allclose(losses.build("degla_igc", scale=7.0)(inputs)["loss"], naive(x, y, negs, 7.0, mask))
    # TGC: the caption prefers the EMA teacher's embedding of itself, fixed scale 10 as in DeGLA
    tgc = losses.build("degla_tgc")
    assert set(tgc.extra_keys) == {"negative_text_features", "ema_text_features"}
    assert torch.allclose(tgc(inputs)["loss"], naive(y, ema, negs, 10.0, mask))
    para = losses.build("degla_tgc", positive="similar_text_features", scale=None)
    ex["similar_text_features"] = unit(4, 3, 10)
    assert torch.allclose(para(inputs)["loss"], naive(y, ex["similar_text_features"], negs, 3.0, mask))
    with pytest.raises(KeyError, match="ema_text_features"):
        tgc(LossInputs(x, y, torch.tensor(3.0), extra={"negative_text_features": negs}))
    with pytest.raises(ValueError, match=r"\[B, K, d\]"):
        grounded_contrast(x, y, negs[0], 3.0)
