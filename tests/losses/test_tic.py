"""TIC (FG-CLIP 2's textual intra-modal contrast) against a naive loop over captions."""
import math

import pytest
import torch
from reference.naive_losses import dot, unit

from clipforge import losses
from clipforge.losses import LossInputs, tic_loss

F64 = torch.float64



def naive_tic(y, t, top_k, thr, negs=None, neg_mask=None, pos=None):
    """For each caption: its top-k most similar other captions (near-duplicates left out) and its own hard
    negatives are pushed away; with a paraphrase it is an InfoNCE whose positive is the paraphrase."""
    total = 0.0
    for i in range(len(y)):
        others = [j for j in range(len(y)) if j != i and float(dot(y[i], y[j]).detach()) <= thr]
        others.sort(key=lambda j: -float(dot(y[i], y[j]).detach()))
        terms = [t * dot(y[i], y[j]) for j in others[:top_k]]
        if negs is not None:
            terms += [t * dot(y[i], negs[i, k]) for k in range(negs.shape[1]) if neg_mask is None or neg_mask[i, k]]
        if pos is not None:
            p = t * dot(y[i], pos[i])
            total = total - (p - torch.log(torch.exp(p) + sum(torch.exp(v) for v in terms)))
        elif terms:
            total = total + torch.log(sum(torch.exp(v) for v in terms))
    return total / len(y)


def captions():
    y = unit(6, 3, 0)
    y[5] = y[0]  # caption 5 repeats caption 0: a near-duplicate, not a negative
    return y, unit(12, 3, 1).reshape(6, 2, 3), torch.tensor([[True, False], [True, True]] * 3), unit(6, 3, 2)


def test_matches_naive():
    y, negs, mask, pos = captions()
    assert torch.allclose(tic_loss(y, None, 2.0, top_k=3), naive_tic(y, 2.0, 3, 0.95))
    assert torch.allclose(tic_loss(y, None, 2.0, negs, mask, top_k=2), naive_tic(y, 2.0, 2, 0.95, negs, mask))
    assert torch.allclose(tic_loss(y, None, 2.0, negs, mask, pos, top_k=10),
                          naive_tic(y, 2.0, 10, 0.95, negs, mask, pos))


def test_gradcheck():
    y, negs, mask, pos = captions()
    leaves = (y[:4].clone().requires_grad_(), negs[:4].clone().requires_grad_(), pos[:4].clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, n, p: tic_loss(a, None, 2.0, n, mask[:4], p, top_k=2), leaves)
    assert torch.autograd.gradcheck(lambda a, n: tic_loss(a, None, 2.0, n, mask[:4], top_k=2), leaves[:2])


def test_properties():
    y, negs, mask, pos = captions()
    # every other caption kept (k >= B, no duplicate filter): log sum_{j != i} exp(t y_i.y_j), by hand
    z = unit(3, 3, 3)
    s = [[float(dot(z[i], z[j])) for j in range(3)] for i in range(3)]
    hand = sum(math.log(sum(math.exp(1.5 * s[i][j]) for j in range(3) if j != i)) for i in range(3)) / 3
    assert math.isclose(float(tic_loss(z, None, 1.5, top_k=5, duplicate_threshold=1.1)), hand, rel_tol=1e-12)
    # only duplicates in the batch: nothing to push away, zero loss
    same = z[:1].repeat(3, 1)
    assert float(tic_loss(same, None, 1.0)) == 0.0
    # permuting the batch (with its negatives and paraphrases) changes nothing
    perm = torch.tensor([3, 1, 5, 0, 2, 4])
    assert torch.allclose(tic_loss(y[perm], None, 2.0, negs[perm], mask[perm], pos[perm], top_k=3),
                          tic_loss(y, None, 2.0, negs, mask, pos, top_k=3))
    # local rows against the gathered batch: the mean over two "processes" is the whole-batch loss
    halves = [tic_loss(y[r * 3:(r + 1) * 3], y, 2.0, negs[r * 3:(r + 1) * 3], mask[r * 3:(r + 1) * 3], offset=3 * r,
                       top_k=3) for r in range(2)]
    assert torch.allclose(sum(halves) / 2, tic_loss(y, None, 2.0, negs, mask, top_k=3))


def test_registry_and_bad_input():
    y, negs, mask, pos = captions()
    x = unit(6, 3, 4)
    li = LossInputs(x, y, torch.tensor(4.0, dtype=F64),
                    extra={"negative_text_features": negs, "negative_text_mask": mask, "similar_text_features": pos})
    term = losses.build("tic", top_k=3)
    assert term.extra_keys == ("negative_text_features",)  # the training program encodes the hard captions
    assert torch.allclose(term(li)["loss"], tic_loss(y, None, 1.0, negs, mask, pos, top_k=3))
    logit_scale = losses.build("tic", top_k=3, scale=None, negatives_key=None)(li)["loss"]
    assert torch.allclose(logit_scale, tic_loss(y, None, 4.0, positives=pos, top_k=3))
    with pytest.raises(KeyError, match="negative_text_features"):
        term(LossInputs(x, y, torch.tensor(1.0)))
    with pytest.raises(ValueError, match=r"\[B, K, d\]"):
        tic_loss(y, None, 1.0, negs[:, 0])
    with pytest.raises(ValueError, match="top_k"):
        losses.build("tic", top_k=0)
