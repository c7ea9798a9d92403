"""``long_clip`` on 2 gloo CPU processes. Its PCA runs over each process's local batch (as in the
authors' code) while the two contrastive terms are batch-global, so it is not the one-process loss
on the whole batch unless the PCA is the identity:

- with k >= the rank of every (local and global) centered batch, PCA_k is the identity and the
  generic check applies (mean of the per-rank losses = the one-process loss, each rank's feature
  gradients / world size = the one-process ones);
- with a smaller k, the same comparison against a reference written here: PCA of each rank's slice
  by an eigen-decomposition of its covariance (not the SVD the term uses), then one-process CLIP
  losses by loops over the whole batch."""

import torch
from reference.distributed import run_terms_across_processes
from reference.naive_losses import clip as naive_clip

from clipforge import losses
from clipforge.losses import LossInputs

WORLD, LOCAL, DIM = 2, 8, 4  # LOCAL - 1 >= DIM: distinct covariance eigenvalues, so eigh has finite gradients
IDENTITY_K, K, SHORT_WEIGHT = DIM, 2, 0.5
TERMS = [("long_clip", {"components": IDENTITY_K}), ("long_clip", {"components": K, "short_weight": SHORT_WEIGHT})]
SCALE = 3.0


def batch():
    g = torch.Generator().manual_seed(0)
    f = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    return {"img": f(WORLD * LOCAL, DIM), "long": f(WORLD * LOCAL, DIM), "short": f(WORLD * LOCAL, 2, DIM)}


def inputs_for(data, sl, rank, world):
    img, long = data["img"][sl].clone().requires_grad_(), data["long"][sl].clone().requires_grad_()
    short = data["short"][sl].clone().requires_grad_()
    li = LossInputs(img, long, torch.tensor(SCALE, dtype=torch.float64), extra={"positive_text_features": short},
                    rank=rank, world_size=world)
    return li, [img, long, short]


def naive_pca(x, k):
    """Mean + projection of the centered rows onto the top-k eigenvectors of their covariance."""
    mean = x.mean(dim=0)
    c = x - mean
    vals, vecs = torch.linalg.eigh(c.t() @ c)
    top = vecs[:, torch.argsort(vals, descending=True)[:k]]
    return c @ top @ top.t() + mean


def per_process_reference(data):
    """One-process loss with the PCA of each rank's slice, and the gradients of the leaves."""
    img, long = data["img"].clone().requires_grad_(), data["long"].clone().requires_grad_()
    short = data["short"].clone().requires_grad_()
    coarse = torch.cat([naive_pca(img[r * LOCAL:(r + 1) * LOCAL], K) for r in range(WORLD)])
    coarse = coarse / coarse.norm(dim=-1, keepdim=True)
    loss = naive_clip(img, long, SCALE) + SHORT_WEIGHT * naive_clip(coarse, short[:, 0], SCALE)
    loss.backward()
    return loss.item(), [img.grad, long.grad, short.grad]


def test_long_clip_across_two_processes():
    results = run_terms_across_processes(__name__)
    data = batch()
    li, leaves = inputs_for(data, slice(None), 0, 1)  # identity PCA: the term itself on one process
    one = losses.build(TERMS[0][0], **TERMS[0][1])(li)["loss"]
    one.backward()
    references = [(one.item(), [leaf.grad for leaf in leaves]), per_process_reference(data)]
    for k, (ref_loss, ref_grads) in enumerate(references):
        mean = sum(results[r][k][0] for r in range(WORLD)) / WORLD
        assert abs(mean - ref_loss) < 1e-9, (TERMS[k], mean, ref_loss)
        for r in range(WORLD):
            sl = slice(r * LOCAL, (r + 1) * LOCAL)
            for which, (theirs, ref) in enumerate(zip(results[r][k][1], ref_grads)):
                assert torch.allclose(torch.from_numpy(theirs), ref[sl], atol=1e-9), (TERMS[k], r, which)
    # the per-process PCA is not the whole-batch PCA: the second term differs from its one-process value
    li, _ = inputs_for(data, slice(None), 0, 1)
    whole = losses.build(TERMS[1][0], **TERMS[1][1])(li)["loss"].item()
    assert abs(whole - references[1][0]) > 1e-4
