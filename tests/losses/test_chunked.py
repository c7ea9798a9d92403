"""The exact chunked CLIP and SigLIP losses: equal to the dense ones within 1e-5 in value and
gradients (features, scale, bias) at several chunk sizes, float64 gradcheck of each custom
autograd function, the distributed (offset) form against a naive loop, and the memory
property: no tensor of B x B elements is ever created."""
import pytest
import torch
from reference.naive_losses import dot, unit
from torch.utils._python_dispatch import TorchDispatchMode

from clipforge import losses
from clipforge.losses import LossInputs, clip_loss, siglip_loss
from clipforge.losses.chunked import chunked_clip_loss, chunked_pairwise_sigmoid, chunked_row_cross_entropy

F64 = torch.float64


def run(fn, chunk, eps=0.1, n=13, d=8):
    x, y = unit(n, d, 2, torch.float32).requires_grad_(), unit(n, d, 3, torch.float32).requires_grad_()
    t = torch.tensor(7.0, requires_grad=True)
    b = torch.tensor(-2.0, requires_grad=True)
    loss = clip_loss(x, y, t, eps, chunk) if fn == "clip" else siglip_loss(x, y, t, b, chunk)
    loss.backward()
    return [loss.detach(), x.grad, y.grad, t.grad] + ([b.grad] if fn == "siglip" else [])


@pytest.mark.parametrize("fn", ["clip", "siglip"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 13, 64])
def test_chunked_equals_dense(fn, chunk):
    for dense, chunked in zip(run(fn, None), run(fn, chunk)):
        assert torch.allclose(dense, chunked, atol=1e-5, rtol=1e-5)


def test_clip_without_label_smoothing_and_large_scale():
    x, y = unit(20, 6, 4, torch.float32), unit(20, 6, 5, torch.float32)
    for t in (1.0, 100.0):  # 100 = CLIP's maximal scale: large logits stay stable (log-sum-exp)
        assert torch.allclose(clip_loss(x, y, t, 0.0, 6), clip_loss(x, y, t), atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    x, y = unit(6, 3, 4).requires_grad_(), unit(6, 3, 5).requires_grad_()
    k = unit(9, 3, 6).requires_grad_()
    t = torch.tensor(4.0, dtype=F64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, t: chunked_clip_loss(x, y, t, 0.2, 4), (x, y, t))
    assert torch.autograd.gradcheck(lambda q, k, t: chunked_row_cross_entropy(q, k, t, 3, 0.2, 4), (x, k, t))
    assert torch.autograd.gradcheck(lambda q, k, t, b: chunked_pairwise_sigmoid(q, k, t, b, 2, 4), (x, k, t, b))


def naive_rows_ce(q, k, t, offset, eps):
    m = len(k)
    total = 0.0
    for i in range(len(q)):
        s = [t * dot(q[i], k[j]) for j in range(m)]
        log_z = torch.log(sum(torch.exp(v) for v in s))
        total = total - sum(((1 - eps) * (j == offset + i) + eps / m) * (s[j] - log_z) for j in range(m))
    return total / len(q)


def naive_rows_sigmoid(q, k, t, b, offset):
    total = 0.0
    for i in range(len(q)):
        for j in range(len(k)):
            z = 1.0 if j == offset + i else -1.0
            total = total - torch.log(torch.sigmoid(z * (t * dot(q[i], k[j]) + b)))
    return total / len(q)


def test_offset_form_matches_naive():
    """Local rows against gathered candidates, positives at the process's offset (the distributed form)."""
    q, k = unit(3, 4, 6), unit(9, 4, 7)
    assert torch.allclose(chunked_row_cross_entropy(q, k, 2.0, 6, 0.1, 2), naive_rows_ce(q, k, 2.0, 6, 0.1))
    assert torch.allclose(chunked_pairwise_sigmoid(q, k, 2.0, -1.0, 3, 2), naive_rows_sigmoid(q, k, 2.0, -1.0, 3))


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


@pytest.mark.parametrize("fn", ["clip", "siglip"])
def test_never_materializes_the_full_logit_matrix(fn):
    n, d, chunk = 96, 8, 16
    x, y = unit(n, d, 8, torch.float32).requires_grad_(), unit(n, d, 9, torch.float32).requires_grad_()
    sizes = {}
    for c in (None, chunk):
        with LargestTensor() as rec:
            loss = clip_loss(x, y, 5.0, 0.1, c) if fn == "clip" else siglip_loss(x, y, 5.0, -1.0, c)
            loss.backward()
        sizes[c] = rec.largest
    assert sizes[None] >= n * n  # the dense loss does hold B x B
    assert sizes[chunk] <= max(chunk * n, n * d)  # the chunked one at most chunk x B


def test_registry_chunked_and_parameter_shapes():
    x, y = unit(6, 4, 10), unit(6, 4, 11)
    scale = torch.tensor([5.0], dtype=F64, requires_grad=True)  # a [1]-shaped parameter gets its gradient
    inputs = LossInputs(x, y, scale, torch.tensor(-2.0, dtype=F64))
    out = losses.build("clip", chunk_size=4, label_smoothing=0.1)(inputs)["loss"]
    assert torch.allclose(out, clip_loss(x, y, 5.0, 0.1))
    out.backward()
    assert scale.grad.shape == (1,)
    assert torch.allclose(losses.build("siglip", chunk_size=4)(inputs)["loss"], siglip_loss(x, y, 5.0, -2.0))


def test_bad_inputs_are_named():
    q, k = unit(3, 4, 12), unit(9, 4, 13)
    with pytest.raises(ValueError, match="do not fit"):
        chunked_row_cross_entropy(q, k, 1.0, offset=7)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_pairwise_sigmoid(q, k, 1.0, 0.0, 0, 0)
    with pytest.raises(ValueError, match=r"\[n, d\] and \[m, d\]"):
        chunked_row_cross_entropy(q, k[:, :3], 1.0)
    with pytest.raises(ValueError, match="single number"):
        chunked_clip_loss(q, q, torch.ones(2))
