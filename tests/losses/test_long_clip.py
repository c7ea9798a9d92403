"""Long-CLIP's primary component matching against a naive reference: PCA by an eigen-decomposition
of the covariance written in the test (not the SVD the term uses), CLIP by loops."""
import pytest
import torch
from reference.naive_losses import clip as naive_clip
from reference.naive_losses import unit

from clipforge import losses
from clipforge.losses import LossInputs, clip_loss, long_clip_loss, pca_reconstruct

F64 = torch.float64


def naive_pca(x, k):
    """Mean + projection of the centered rows onto the top-k eigenvectors of the covariance."""
    mean = sum(x[i] for i in range(len(x))) / len(x)
    c = x - mean
    cov = c.t() @ c
    vals, vecs = torch.linalg.eigh(cov)  # ascending
    top = vecs[:, torch.argsort(vals, descending=True)[:k]]
    return torch.stack([mean + sum((c[i] @ top[:, j]) * top[:, j] for j in range(k)) for i in range(len(x))])


def naive(x, long, short, t, k, w):
    coarse = naive_pca(x, k)
    coarse = coarse / coarse.norm(dim=-1, keepdim=True)
    return naive_clip(x, long, t) + w * naive_clip(coarse, short, t)


def batch(b=8, d=6):
    return unit(b, d, 0), unit(b, d, 1), unit(b, d, 2)


@pytest.mark.parametrize("k,w", [(2, 1.0), (3, 0.5)])
def test_matches_naive(k, w):
    x, long, short = batch()
    assert torch.allclose(pca_reconstruct(x, k), naive_pca(x, k), atol=1e-10)
    assert torch.allclose(long_clip_loss(x, long, short, 2.5, k, w), naive(x, long, short, 2.5, k, w), atol=1e-10)


def test_gradcheck():
    x, long, short = batch()
    leaves = tuple(v.clone().requires_grad_() for v in (x, long, short))
    assert torch.autograd.gradcheck(lambda a, b, c: long_clip_loss(a, b, c, 2.0, components=3), leaves)
    # through the PCA alone (the basis moves with the features)
    assert torch.autograd.gradcheck(lambda a: (pca_reconstruct(a, 2) ** 3).sum(), (leaves[0],))


def test_properties():
    x, long, short = batch()
    # the reduction is a rank-k affine map of the batch: centered rows span k dimensions
    rec = pca_reconstruct(x, 2)
    assert torch.linalg.matrix_rank(rec - rec.mean(0)) == 2
    # with k >= B - 1 every component is kept: exactly the features, so the loss is the sum of two CLIP losses
    assert torch.equal(pca_reconstruct(x, 7), x)
    assert torch.allclose(long_clip_loss(x, long, short, 3.0, components=32),
                          clip_loss(x, long, 3.0) + clip_loss(x, short, 3.0))
    # the coarse image feature differs from the full one when components are dropped
    assert not torch.allclose(long_clip_loss(x, long, short, 3.0, components=1),
                              clip_loss(x, long, 3.0) + clip_loss(x, short, 3.0))
    # bf16 features are reduced in fp32 and come back in bf16
    assert pca_reconstruct(x.bfloat16(), 2).dtype == torch.bfloat16


def test_registry_and_bad_input():
    x, long, short = batch()
    mask = torch.ones(8, 2, dtype=torch.bool)
    pos = torch.stack([short, unit(8, 6, 3)], 1)
    li = LossInputs(x, long, torch.tensor(2.0, dtype=F64),
                    extra={"positive_text_features": pos, "positive_text_mask": mask})
    term = losses.build("long_clip", components=3, short_weight=0.5)
    assert set(term.extra_keys) == {"positive_text_features"}
    out = term(li)
    assert torch.allclose(out["loss"], naive(x, long, short, 2.0, 3, 0.5), atol=1e-10)
    assert torch.allclose(out["loss"], out["long"] + 0.5 * out["short"])
    with pytest.raises(ValueError, match="short caption for every sample"):
        term(LossInputs(x, long, torch.tensor(2.0), extra={"positive_text_features": pos,
                                                          "positive_text_mask": torch.zeros_like(mask)}))
    with pytest.raises(KeyError, match="positive_text_features"):
        term(LossInputs(x, long, torch.tensor(2.0)))
    with pytest.raises(TypeError, match="no option"):
        losses.build("long_clip", k=3)
    with pytest.raises(ValueError, match="components"):
        losses.build("long_clip", components=0)
    with pytest.raises(ValueError, match="paired"):
        long_clip_loss(x, long[:4], short, 1.0)
