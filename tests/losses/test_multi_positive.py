"""Multi-positive contrast (several positive texts per image: DreamLIP sub-captions, LaCLIP
rewrites) against naive loops, in its joint and per-slot forms."""
import pytest
import torch
from reference.naive_losses import dot, log_softmax_at, unit

from clipforge import losses
from clipforge.losses import LossInputs, clip_loss, multi_positive_loss

F64 = torch.float64



def naive(x, pos, mask, t, mode):
    b, p = mask.shape
    valid = [(j, q) for j in range(b) for q in range(p) if mask[j, q]]
    i2t = t2i = 0.0
    for i in range(b):
        mine = [q for q in range(p) if mask[i, q]]
        for q in mine:
            if mode == "joint":  # every valid text of the batch is a candidate
                cands = valid
            else:  # only the texts in the same slot
                cands = [(j, r) for (j, r) in valid if r == q]
            scores = [t * dot(x[i], pos[j, r]) for (j, r) in cands]
            i2t = i2t - log_softmax_at(scores, cands.index((i, q))) / len(mine)
            scores = [t * dot(pos[i, q], x[j]) for j in range(b)]
            t2i = t2i - log_softmax_at(scores, i) / len(mine)
    return 0.5 * (i2t + t2i) / b


def batch():
    x, pos = unit(4, 3, 0), unit(12, 3, 1).reshape(4, 3, 3)
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True], [False, True, True]])
    return x, pos, mask


@pytest.mark.parametrize("mode", ["joint", "per_slot"])
def test_matches_naive(mode):
    x, pos, mask = batch()
    assert torch.allclose(multi_positive_loss(x, pos, 2.5, mask, mode=mode), naive(x, pos, mask, 2.5, mode))


@pytest.mark.parametrize("mode", ["joint", "per_slot"])
def test_gradcheck(mode):
    x, pos, mask = batch()
    leaves = (x.clone().requires_grad_(), pos.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b: multi_positive_loss(a, b, 2.0, mask, mode=mode), leaves)


def test_properties():
    x, pos, mask = batch()
    # one positive per image: both forms are the CLIP loss
    for mode in ("joint", "per_slot"):
        assert torch.allclose(multi_positive_loss(x, pos[:, :1], 3.0, mode=mode), clip_loss(x, pos[:, 0], 3.0))
    # the joint form does not depend on the order of an image's positives
    swapped = pos[:, [2, 0, 1]]
    assert torch.allclose(multi_positive_loss(x, swapped, 3.0, mask[:, [2, 0, 1]]),
                          multi_positive_loss(x, pos, 3.0, mask))
    # permuting the batch changes nothing
    perm = torch.tensor([2, 0, 3, 1])
    for mode in ("joint", "per_slot"):
        assert torch.allclose(multi_positive_loss(x[perm], pos[perm], 3.0, mask[perm], mode=mode),
                              multi_positive_loss(x, pos, 3.0, mask, mode=mode))
    # a slot that no image fills anywhere (all padding) leaves values and gradients finite
    padded = torch.cat([mask, torch.zeros(4, 1, dtype=torch.bool)], 1)
    p4 = torch.cat([pos, unit(4, 3, 2)[:, None]], 1).requires_grad_()
    out = multi_positive_loss(x, p4, 3.0, padded, mode="per_slot")
    out.backward()
    assert torch.allclose(out, multi_positive_loss(x, pos, 3.0, mask, mode="per_slot"))
    assert torch.isfinite(p4.grad).all() and p4.grad[:, 3].abs().max() == 0
    # local rows against gathered candidates: the mean over two "processes" is the whole-batch loss
    halves = [multi_positive_loss(x[2 * r:2 * r + 2], pos[2 * r:2 * r + 2], 3.0, mask[2 * r:2 * r + 2], x, pos, mask,
                                  offset=2 * r) for r in range(2)]
    assert torch.allclose(sum(halves) / 2, multi_positive_loss(x, pos, 3.0, mask))


def test_registry_and_bad_input():
    x, pos, mask = batch()
    li = LossInputs(x, unit(4, 3, 3), torch.tensor(3.0, dtype=F64),
                    extra={"positive_text_features": pos, "positive_text_mask": mask})
    assert torch.allclose(losses.build("multi_positive", mode="per_slot")(li)["loss"],
                          multi_positive_loss(x, pos, 3.0, mask, mode="per_slot"))
    with pytest.raises(ValueError, match="at least one positive"):
        multi_positive_loss(x, pos, 3.0, torch.zeros_like(mask))
    with pytest.raises(ValueError, match=r"\[B, P, d\]"):
        multi_positive_loss(x, pos[:3], 3.0)
    with pytest.raises(ValueError, match="mode"):
        losses.build("multi_positive", mode="all")
    with pytest.raises(KeyError, match="positive_text_features"):
        losses.build("multi_positive")(LossInputs(x, x, torch.tensor(1.0)))
