"""HQ-CLIP's short-tag positives and negative descriptions against a naive reference."""
import math

import torch
from reference.naive_losses import dot, log_softmax_at, unit

from clipforge import losses
from clipforge.losses import LossInputs, clip_loss, hqclip_loss

F64 = torch.float64


def naive(x, y, tag, s, negs=None, mask=None):
    b = len(x)
    i2t = 0.0
    for i in range(b):
        cands = [s * dot(x[i], v) for v in list(y) + list(tag)]
        if negs is not None:
            cands += [s * dot(x[i], negs[i, k]) for k in range(negs.shape[1]) if mask is None or mask[i, k]]
        i2t = i2t - 0.5 * (log_softmax_at(cands, i) + log_softmax_at(cands, b + i))
    t2i = 0.0
    for texts in (y, tag):
        for i in range(b):
            t2i = t2i - log_softmax_at([s * dot(texts[i], x[j]) for j in range(b)], i)
    return 0.5 * (i2t / b + t2i / (2 * b))


def test_matches_naive_and_gradcheck():
    x, y, tag = unit(4, 3, 0), unit(4, 3, 1), unit(4, 3, 2)
    negs = unit(8, 3, 3).reshape(4, 2, 3)
    mask = torch.tensor([[True, False], [True, True], [False, False], [False, True]])
    assert torch.allclose(hqclip_loss(x, y, tag, 3.0, negs, mask), naive(x, y, tag, 3.0, negs, mask))
    assert torch.allclose(hqclip_loss(x, y, tag, 3.0), naive(x, y, tag, 3.0))
    leaves = tuple(v.clone().requires_grad_() for v in (x, y, tag, negs)) + (
        torch.tensor(2.0, dtype=F64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(lambda a, b, c, n, t: hqclip_loss(a, b, c, t, n, mask), leaves)


def test_known_value_and_permutation():
    x, y = unit(5, 4, 4), unit(5, 4, 5)
    # tags identical to the descriptions: every positive appears twice among the candidates, so
    # image -> text costs exactly log 2 more than CLIP's, text -> image is CLIP's: L = CLIP + log(2)/2
    assert torch.allclose(hqclip_loss(x, y, y, 6.0), clip_loss(x, y, 6.0) + 0.5 * math.log(2))
    tag, negs = unit(5, 4, 6), unit(10, 4, 7).reshape(5, 2, 4)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(hqclip_loss(x[perm], y[perm], tag[perm], 6.0, negs[perm]), hqclip_loss(x, y, tag, 6.0, negs))


def test_registered_term():
    x, y, tag = unit(4, 3, 8), unit(4, 3, 9), unit(4, 3, 10)
    negs, mask = unit(4, 3, 11).reshape(4, 1, 3), torch.tensor([[True], [False], [True], [True]])
    ex = {"short_tag_features": tag, "negative_text_features": negs, "negative_text_mask": mask}
    out = losses.build("hqclip")(LossInputs(x, y, torch.tensor(3.0, dtype=F64), extra=ex))["loss"]
    assert torch.allclose(out, naive(x, y, tag, 3.0, negs, mask))


def test_negatives_option_requires_the_negative_descriptions():
    import pytest

    x, y, tag = unit(4, 3, 31), unit(4, 3, 32), unit(4, 3, 33)
    negs = unit(8, 3, 34).reshape(4, 2, 3)
    term = losses.build("hqclip", negatives=True)
    assert term.extra_keys == ("short_tag_features", "negative_text_features")
    li = LossInputs(x, y, torch.tensor(2.0, dtype=torch.float64),
                    extra={"short_tag_features": tag, "negative_text_features": negs})
    assert torch.allclose(term(li)["loss"], naive(x, y, tag, 2.0, negs))
    with pytest.raises(KeyError, match="negative_text_features"):
        term(LossInputs(x, y, torch.tensor(2.0), extra={"short_tag_features": tag}))
    with pytest.raises(ValueError, match="negatives must be true or false"):
        losses.build("hqclip", negatives=1)
