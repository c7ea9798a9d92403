"""CWCL: the continuously weighted contrastive loss as a naive loop from the paper's equation
(weights from the frozen reference modality, both directions), gradients (float64 gradcheck for
the trained modality; autograd of the naive reference, with the same detached weights, for the
reference modality), the limiting case w = I (plain CLIP) and the registry entry."""
import pytest
import torch
from reference.naive_losses import dot, unit

from clipforge import losses
from clipforge.losses import LossInputs, clip_loss, cwcl_loss

F64 = torch.float64


def naive_direction(q, k, w, t):
    """-1/N sum_i 1/(sum_j w_ij) sum_j w_ij log softmax_j(t q_i·k_j)."""
    n = len(q)
    total = 0.0
    for i in range(n):
        logits = [t * dot(q[i], k[j]) for j in range(n)]
        log_z = torch.log(sum(torch.exp(s) for s in logits))
        total = total - sum(w[i][j] * (logits[j] - log_z) for j in range(n)) / sum(w[i])
    return total / n


def naive_cwcl(p, r, t, symmetric=True, source=None):
    source = (r if source is None else source).detach()
    n = len(p)
    w = [[(1 + dot(source[i], source[j])) / 2 for j in range(n)] for i in range(n)]
    forward = naive_direction(p, r, w, t)
    return (forward + naive_direction(r, p, w, t)) / 2 if symmetric else forward


@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_naive(symmetric):
    x, y = unit(5, 3, 5), unit(5, 3, 6)
    # reference "image": the image tower is frozen, the text tower (p) learns
    assert torch.allclose(cwcl_loss(x, y, 4.0, "image", symmetric), naive_cwcl(y, x, 4.0, symmetric), atol=1e-12)
    assert torch.allclose(cwcl_loss(x, y, 4.0, "text", symmetric), naive_cwcl(x, y, 4.0, symmetric), atol=1e-12)


def test_gradients():
    x, y = unit(5, 3, 7), unit(5, 3, 8)
    assert torch.autograd.gradcheck(lambda p: cwcl_loss(x, p, 4.0, "image"), (y.clone().requires_grad_(),))
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    ours = torch.autograd.grad(cwcl_loss(xs, ys, 4.0, "image"), (xs, ys))
    theirs = torch.autograd.grad(naive_cwcl(ys, xs, 4.0), (xs, ys))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-12)


def test_one_hot_weights_give_clip():
    """Reference vectors r_2 = -r_1 have w_12 = 0, so the targets are one-hot and CWCL is CLIP."""
    r = unit(1, 3, 9)
    r = torch.cat([r, -r])
    p = unit(2, 3, 10)
    assert torch.allclose(cwcl_loss(r, p, 4.0, "image"), clip_loss(r, p, 4.0), atol=1e-12)
    one_way = torch.nn.functional.cross_entropy(4.0 * p @ r.t(), torch.arange(2))
    assert torch.allclose(cwcl_loss(r, p, 4.0, "image", symmetric=False), one_way, atol=1e-12)


def test_permutation_invariance():
    x, y = unit(6, 3, 11), unit(6, 3, 12)
    perm = torch.tensor([2, 5, 0, 1, 4, 3])
    assert torch.allclose(cwcl_loss(x[perm], y[perm], 3.0), cwcl_loss(x, y, 3.0))


def test_registry_with_teacher_weights():
    x, y, teacher = unit(5, 3, 13), unit(5, 3, 14), unit(5, 6, 15)
    inputs = LossInputs(x, y, torch.tensor(4.0, dtype=F64), extra={"teacher_image_features": teacher})
    term = losses.build("cwcl", weights_key="teacher_image_features")
    assert term.extra_keys == ("teacher_image_features",)
    assert torch.allclose(term(inputs)["loss"], naive_cwcl(y, x, 4.0, source=teacher), atol=1e-12)
    assert torch.allclose(losses.build("cwcl", reference="text")(inputs)["loss"], naive_cwcl(x, y, 4.0), atol=1e-12)
    with pytest.raises(KeyError, match="teacher_image_features"):
        term(LossInputs(x, y, torch.tensor(4.0)))
    with pytest.raises(ValueError, match="reference must be"):
        losses.build("cwcl", reference="audio")
    with pytest.raises(ValueError, match="one row per pair"):
        cwcl_loss(x, y, 4.0, weight_features=teacher[:3])
