"""DreamLIP's subcaption-specific grouping loss against a naive loop over sub-captions and patches."""
import math

import pytest
import torch
from reference.naive_losses import dot, log_softmax_at, unit

from clipforge import losses
from clipforge.losses import LossInputs, dreamlip_grouping_loss
from clipforge.losses.dreamlip import grouping_weights

F64 = torch.float64



def naive_group(sub, patches, norm, delta):
    sims = [dot(sub, p) for p in patches]
    if norm == "minmax":
        lo, hi = min(sims, key=float), max(sims, key=float)
        a = [(s - lo) / (hi - lo + 1e-10) for s in sims]
    else:
        z = sum(torch.exp(s) for s in sims)
        a = [torch.exp(s) / z for s in sims]
    thr = 1 / len(patches) if delta < 0 else delta
    a = [v if float(v) >= thr else 0.0 * v for v in a]
    g = sum(w * p for w, p in zip(a, patches)) / sum(a)
    return g / g.norm()


def naive(subs, tokens, mask, t, norm="minmax", delta=0.1):
    b, p = mask.shape
    items = [(i, k) for i in range(b) for k in range(p) if mask[i, k]]
    groups = {(i, k): naive_group(subs[i, k], tokens[i], norm, delta) for (i, k) in items}
    total = 0.0
    for a, (i, k) in enumerate(items):
        to_regions = [t * dot(subs[i, k], groups[o]) for o in items]
        to_texts = [t * dot(groups[(i, k)], subs[o]) for o in items]
        total = total - 0.5 * (log_softmax_at(to_regions, a) + log_softmax_at(to_texts, a))
    return total / len(items)


def batch():
    subs = unit(6, 3, 0).reshape(3, 2, 3)
    tokens = unit(12, 3, 1).reshape(3, 4, 3)
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    return subs, tokens, mask


@pytest.mark.parametrize("norm,delta", [("minmax", 0.1), ("softmax", -1.0), ("minmax", 0.5)])
def test_matches_naive(norm, delta):
    subs, tokens, mask = batch()
    fast = dreamlip_grouping_loss(subs, tokens, 3.0, mask, norm, delta)
    assert torch.allclose(fast, naive(subs, tokens, mask, 3.0, norm, delta))


def test_gradcheck():
    subs, tokens, mask = batch()
    leaves = (subs.clone().requires_grad_(), tokens.clone().requires_grad_())
    for norm, delta in (("minmax", 0.1), ("softmax", -1.0)):
        assert torch.autograd.gradcheck(lambda a, b: dreamlip_grouping_loss(a, b, 2.0, mask, norm, delta), leaves)


def test_properties():
    # hand-computed grouping: similarities 1, 0.5, 0, -1 -> min-max 1, 0.75, 0.5, 0 -> threshold 0.6 keeps
    # the first two, renormalized to 4/7 and 3/7
    sub = torch.tensor([[1.0, 0.0]], dtype=F64)
    patches = torch.tensor([[[1.0, 0.0], [0.5, math.sqrt(0.75)], [0.0, 1.0], [-1.0, 0.0]]], dtype=F64)
    w = grouping_weights(sub, patches, "minmax", 0.6)
    assert torch.allclose(w, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]], dtype=F64))
    # permuting the batch and the patch order leaves the loss unchanged
    subs, tokens, mask = batch()
    base = dreamlip_grouping_loss(subs, tokens, 3.0, mask)
    perm = torch.tensor([2, 0, 1])
    assert torch.allclose(dreamlip_grouping_loss(subs[perm], tokens[perm], 3.0, mask[perm]), base)
    assert torch.allclose(dreamlip_grouping_loss(subs, tokens[:, [3, 1, 0, 2]], 3.0, mask), base)
    # local rows against the gathered sub-captions and regions: the mean over two "processes" equals the
    # whole-batch loss although the processes hold different numbers of valid sub-captions
    from clipforge.losses.dreamlip import grouped_features

    subs4, tokens4 = unit(8, 3, 2).reshape(4, 2, 3), unit(16, 3, 3).reshape(4, 4, 3)
    mask4 = torch.tensor([[True, True], [True, False], [False, True], [False, True]])
    gathered = (subs4, grouped_features(subs4, tokens4), mask4)
    halves = [dreamlip_grouping_loss(subs4[2 * r:2 * r + 2], tokens4[2 * r:2 * r + 2], 3.0, mask4[2 * r:2 * r + 2],
                                     gathered=gathered, offset=2 * r, world_size=2) for r in range(2)]
    assert torch.allclose(sum(halves) / 2, dreamlip_grouping_loss(subs4, tokens4, 3.0, mask4))


def test_registry_and_bad_input():
    subs, tokens, mask = batch()
    li = LossInputs(unit(3, 3, 4), unit(3, 3, 5), torch.tensor(3.0, dtype=F64), image_tokens=2 * tokens,
                    extra={"positive_text_features": subs, "positive_text_mask": mask})
    out = losses.build("dreamlip_grouping")(li)["loss"]  # tokens are normalized by the term
    assert torch.allclose(out, dreamlip_grouping_loss(subs, tokens, 3.0, mask))
    assert torch.allclose(losses.build("dreamlip_grouping", scale=5.0)(li)["loss"],
                          dreamlip_grouping_loss(subs, tokens, 5.0, mask))
    with pytest.raises(KeyError, match="image_tokens"):
        no_tokens = LossInputs(li.image_features, li.text_features, li.logit_scale, extra=li.extra)
        losses.build("dreamlip_grouping")(no_tokens)
    with pytest.raises(ValueError, match="no valid sub-caption"):
        dreamlip_grouping_loss(subs, tokens, 3.0, torch.zeros_like(mask))
    with pytest.raises(ValueError, match=r"image_tokens \[B, N, d\]"):
        dreamlip_grouping_loss(subs, tokens[:2], 3.0, mask)
    with pytest.raises(ValueError, match="norm"):
        losses.build("dreamlip_grouping", norm="max")
