"""Hard-negative contrast (NegCLIP / CLIP-IN's symmetric form) against a naive loop reference."""
import pytest
import torch
from reference.naive_losses import dot, log_softmax_at, unit

from clipforge import losses
from clipforge.losses import LossInputs, clip_loss, hard_negative_loss

F64 = torch.float64


def naive(x, y, t, negs=None, nmask=None, nimg=None, imask=None, scope="own"):
    """Loops over samples: image i's candidates are all texts plus the allowed negative captions,
    text i's candidates all images plus the allowed negative images."""
    b = len(x)

    def extra(q, pool, mask, i):
        if pool is None:
            return []
        owners = [i] if scope == "own" else range(b)
        return [t * dot(q, pool[o, k]) for o in owners for k in range(pool.shape[1]) if mask is None or mask[o, k]]

    total = 0.0
    for i in range(b):
        s = [t * dot(x[i], y[j]) for j in range(b)] + extra(x[i], negs, nmask, i)
        total = total - log_softmax_at(s, i)
        s = [t * dot(y[i], x[j]) for j in range(b)] + extra(y[i], nimg, imask, i)
        total = total - log_softmax_at(s, i)
    return total / (2 * b)


@pytest.mark.parametrize("scope", ["own", "batch"])
def test_matches_naive_with_masks_and_negative_images(scope):
    x, y = unit(4, 3, 0), unit(4, 3, 1)
    negs, nimg = unit(8, 3, 2).reshape(4, 2, 3), unit(4, 3, 3).reshape(4, 1, 3)
    nmask = torch.tensor([[True, False], [True, True], [False, False], [True, True]])
    imask = torch.tensor([[True], [False], [True], [True]])
    got = hard_negative_loss(x, y, 3.0, negs, nmask, nimg, imask, scope=scope)
    assert torch.allclose(got, naive(x, y, 3.0, negs, nmask, nimg, imask, scope))
    assert torch.allclose(hard_negative_loss(x, y, 3.0, negs, scope=scope), naive(x, y, 3.0, negs, scope=scope))


@pytest.mark.parametrize("scope", ["own", "batch"])
def test_gradcheck(scope):
    x, y = unit(3, 3, 4), unit(3, 3, 5)
    negs, nimg = unit(6, 3, 6).reshape(3, 2, 3), unit(3, 3, 7).reshape(3, 1, 3)
    mask = torch.tensor([[True, False], [True, True], [False, True]])
    leaves = tuple(v.clone().requires_grad_() for v in (x, y, negs, nimg)) + (
        torch.tensor(2.0, dtype=F64, requires_grad=True),
    )
    # including the learned scale, whose gradient must stay finite next to masked-out negatives
    assert torch.autograd.gradcheck(lambda a, b, n, v, t: hard_negative_loss(a, b, t, n, mask, v, scope=scope), leaves)


def test_limiting_cases_and_permutation():
    x, y = unit(5, 4, 8), unit(5, 4, 9)
    negs = unit(10, 4, 10).reshape(5, 2, 4)
    # no negatives, or all masked out: exactly the CLIP loss
    assert torch.allclose(hard_negative_loss(x, y, 4.0), clip_loss(x, y, 4.0))
    none = torch.zeros(5, 2, dtype=torch.bool)
    for scope in ("own", "batch"):
        assert torch.allclose(hard_negative_loss(x, y, 4.0, negs, none, scope=scope), clip_loss(x, y, 4.0))
    # a negative can only make the task harder: the loss grows
    assert hard_negative_loss(x, y, 4.0, negs) > clip_loss(x, y, 4.0)
    # "batch" sees every sample's negatives, a superset of "own": larger loss
    assert hard_negative_loss(x, y, 4.0, negs, scope="batch") > hard_negative_loss(x, y, 4.0, negs)
    # permuting the batch (samples together with their negatives) leaves the loss unchanged
    p = torch.randperm(5, generator=torch.Generator().manual_seed(0))
    for scope in ("own", "batch"):
        assert torch.allclose(hard_negative_loss(x[p], y[p], 4.0, negs[p], scope=scope),
                              hard_negative_loss(x, y, 4.0, negs, scope=scope))


def test_registered_term_and_errors():
    x, y = unit(4, 3, 11), unit(4, 3, 12)
    negs, mask = unit(8, 3, 13).reshape(4, 2, 3), torch.tensor([[True, False]] * 4)
    nimg = unit(4, 3, 14).reshape(4, 1, 3)
    ex = {"negative_text_features": negs, "negative_text_mask": mask, "negative_image_features": nimg}
    for scope in ("own", "batch"):
        out = losses.build("hard_negative", scope=scope)(LossInputs(x, y, torch.tensor(3.0, dtype=F64), extra=ex))
        assert torch.allclose(out["loss"], naive(x, y, 3.0, negs, mask, nimg, scope=scope))
    with pytest.raises(KeyError, match="negative_text_features"):
        losses.build("hard_negative")(LossInputs(x, y, torch.tensor(3.0)))
    with pytest.raises(ValueError, match="scope"):
        losses.build("hard_negative", scope="global")
    with pytest.raises(ValueError, match=r"\[B, K, d\]"):
        hard_negative_loss(x, y, 3.0, negs[:3])
    with pytest.raises(ValueError, match="mask"):
        hard_negative_loss(x, y, 3.0, negs, mask[:, :1])


def test_negative_images_option_requires_them():
    x, y = unit(4, 3, 21), unit(4, 3, 22)
    negs, nimg = unit(8, 3, 23).reshape(4, 2, 3), unit(4, 3, 24).reshape(4, 1, 3)
    term = losses.build("hard_negative", negative_images=True)
    assert term.extra_keys == ("negative_text_features", "negative_image_features")  # clipforge train renders them
    assert losses.build("hard_negative").extra_keys == ("negative_text_features",)
    li = LossInputs(x, y, torch.tensor(3.0, dtype=F64), extra={"negative_text_features": negs,
                                                               "negative_image_features": nimg})
    assert torch.allclose(term(li)["loss"], naive(x, y, 3.0, negs, None, nimg))
    with pytest.raises(KeyError, match="negative_image_features"):
        term(LossInputs(x, y, torch.tensor(3.0), extra={"negative_text_features": negs}))
    with pytest.raises(ValueError, match="negative_images must be true or false"):
        losses.build("hard_negative", negative_images="yes")
