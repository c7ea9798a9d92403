"""Symile: the multilinear-inner-product contrast as a naive loop over tuples, with O(N)
(shifted or random re-indexing of the non-anchor modalities) and O(N^2) negatives; float64
gradcheck, M = 2 equals CLIP, batch-permutation invariance of the all-combinations form, the
registry entry with extra["modality_features"]."""
import itertools
import math

import pytest
import torch
from reference.naive_losses import unit

from clipforge import losses
from clipforge.losses import LossInputs, clip_loss, symile_loss

F64 = torch.float64


def mip(*vectors):
    return sum(math.prod(float(v[k]) for v in vectors) for k in range(len(vectors[0])))


def naive_symile(feats, t, negatives, perms=None):
    """perms[m][k]: index map of the (k+1)-th other modality for anchor m (None: cyclic shift by k+1)."""
    m_count, n = len(feats), len(feats[0])
    total = 0.0
    for m in range(m_count):
        others = [f for k, f in enumerate(feats) if k != m]
        for i in range(n):
            if negatives == "n_squared":
                tuples = list(itertools.product(range(n), repeat=len(others)))
                scores = [t * mip(feats[m][i], *[o[j] for o, j in zip(others, c)]) for c in tuples]
                pos = tuples.index(tuple([i] * len(others)))
            else:
                scores = []
                for j in range(n):
                    if j == i:
                        idx = [i] * len(others)
                    else:
                        idx = [j] + [(j + k) % n if perms is None else int(perms[m][k - 1][j])
                                     for k in range(1, len(others))]
                    scores.append(t * mip(feats[m][i], *[o[j2] for o, j2 in zip(others, idx)]))
                pos = i
            top = max(scores)
            total -= scores[pos] - (top + math.log(sum(math.exp(s - top) for s in scores)))
    return total / (m_count * n)


@pytest.mark.parametrize("negatives", ["n", "n_squared"])
def test_matches_naive(negatives):
    feats = [unit(4, 3, s) for s in (10, 11, 12)]
    assert abs(float(symile_loss(feats, 3.0, negatives)) - naive_symile(feats, 3.0, negatives)) < 1e-10
    four = [unit(3, 2, s) for s in (13, 14, 15, 16)]
    assert abs(float(symile_loss(four, 2.0, negatives)) - naive_symile(four, 2.0, negatives)) < 1e-10


def test_random_permutation_matches_naive():
    feats = [unit(5, 3, s) for s in (17, 18, 19)]
    torch.manual_seed(3)
    ours = float(symile_loss(feats, 3.0, "n", permutation="random"))
    torch.manual_seed(3)
    perms = [[torch.randperm(5)] for _ in range(3)]  # one per anchor: the second other modality is re-indexed
    assert abs(ours - naive_symile(feats, 3.0, "n", perms)) < 1e-10


@pytest.mark.parametrize("negatives", ["n", "n_squared"])
def test_gradcheck_float64(negatives):
    args = tuple(unit(4, 3, s).requires_grad_() for s in (20, 21, 22))
    assert torch.autograd.gradcheck(lambda a, b, c: symile_loss([a, b, c], 2.0, negatives), args)


@pytest.mark.parametrize("negatives", ["n", "n_squared"])
@pytest.mark.parametrize("permutation", ["shift", "random"])
def test_two_modalities_is_clip(negatives, permutation):
    x, y = unit(6, 4, 23), unit(6, 4, 24)
    two = symile_loss([x, y], 3.0, negatives, permutation=permutation)
    assert torch.allclose(two, clip_loss(x, y, 3.0), atol=1e-12)


def test_all_combinations_are_permutation_invariant():
    feats = [unit(4, 3, s) for s in (25, 26, 27)]
    p = torch.tensor([2, 0, 3, 1])
    assert torch.allclose(symile_loss([f[p] for f in feats], 3.0, "n_squared"), symile_loss(feats, 3.0, "n_squared"))


def test_registry_and_errors():
    feats = [unit(4, 3, s) for s in (28, 29, 30)]
    inputs = LossInputs(feats[0], feats[1], torch.tensor(3.0, dtype=F64), extra={"modality_features": [feats[2]]})
    for negatives in ("n", "n_squared"):
        out = losses.build("symile", negatives=negatives)(inputs)["loss"]
        assert torch.allclose(out, symile_loss(feats, 3.0, negatives))
    with pytest.raises(KeyError, match="modality_features"):
        losses.build("symile")(LossInputs(feats[0], feats[1], torch.tensor(3.0)))
    with pytest.raises(ValueError, match="at least 2 modalities"):
        symile_loss(feats[:1], 1.0)
    with pytest.raises(ValueError, match="one shape"):
        symile_loss([feats[0], feats[1][:3]], 1.0)
    with pytest.raises(ValueError, match="negatives must be"):
        losses.build("symile", negatives="all")
    with pytest.raises(ValueError, match="n_squared negatives would score"):
        symile_loss([unit(101, 2, 1)] * 4, 1.0, "n_squared")
