"""Exact CLIP and SigLIP losses in O(B·d + chunk·B) memory instead of O(B²).

A dense CLIP or SigLIP loss materializes the B x B logit matrix, and autograd keeps it (and
its softmax) for the backward pass: at B = 32,768 one such matrix is 4 GiB in fp32. The
``torch.autograd.Function`` s below never hold more than ``chunk`` rows of it. The forward
pass keeps per-row (and per-column) log-sum-exps, O(B); the backward pass recomputes each
block of ``chunk`` rows of logits and turns it into gradients at once. With G the gradient of
the loss with respect to the logits s = t q kᵀ (+ b), every form below back-propagates as

    dq = t G k,    dk = t Gᵀ q,    dt = sum_ij G_ij q_i·k_j,    db = sum_ij G_ij

- :class:`SymmetricInfoNCE` (CLIP, Radford et al. 2021, on one process): the mean of the
  image-to-text and text-to-image cross-entropies with label smoothing eps,
  ``L = 1/2 (mean_i lse_row_i + mean_j lse_col_j) - (1 - eps) mean_i s_ii - eps/B² sum_ij s_ij``,
  ``G = [ (softmax_row(s) + softmax_col(s)) / 2 - (1 - eps) I - eps/B ] / B``. The column
  log-sum-exps are accumulated over row blocks with ``logaddexp``, so each block of logits is
  computed once in the forward pass and once in the backward pass.
- :class:`RowCrossEntropy` (one direction, for local rows against gathered candidates):
  ``CE_i = lse_i - (1 - eps) s_{i, offset+i} - eps/m sum_j s_ij`` over m candidates, averaged
  over the n rows; ``G = (softmax(s) - target) / n``.
- :class:`PairwiseSigmoid` (SigLIP, Zhai et al. 2023): ``1/n sum_ij -log σ(z_ij s_ij)`` with
  z = +1 at ``(i, offset + i)`` and -1 elsewhere; ``-log σ(z s) = softplus(-z s)``, so
  ``G = (σ(s) - [z = 1]) / n``.

Each is exact: the same value and gradients as the dense loss up to float summation order
(``tests/losses/test_chunked.py`` checks 1e-5 agreement and runs gradcheck in float64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


class SymmetricInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, scale: Tensor, eps: float, chunk: int) -> Tensor:
        n = x.shape[0]
        lse_row = torch.empty(n, dtype=x.dtype, device=x.device)
        lse_col = torch.full((n,), float("-inf"), dtype=x.dtype, device=x.device)
        for a in range(0, n, chunk):
            s = (x[a : a + chunk] @ y.t()).mul_(scale)
            lse_row[a : a + chunk] = torch.logsumexp(s, dim=1)
            lse_col = torch.logaddexp(lse_col, torch.logsumexp(s, dim=0))
        loss = 0.5 * (lse_row.mean() + lse_col.mean()) - (1 - eps) * scale * (x * y).sum(-1).mean()
        if eps:
            loss = loss - eps * scale * (x.mean(0) @ y.mean(0))
        ctx.save_for_backward(x, y, scale, lse_row, lse_col)
        ctx.eps, ctx.chunk = eps, chunk
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, y, scale, lse_row, lse_col = ctx.saved_tensors
        eps, chunk, n = ctx.eps, ctx.chunk, x.shape[0]
        g = grad_out / n
        dx, dy = torch.empty_like(x), torch.zeros_like(y)
        dscale = torch.zeros((), dtype=x.dtype, device=x.device)
        for a in range(0, n, chunk):
            xa = x[a : a + chunk]
            s = (xa @ y.t()).mul_(scale)
            row = (s - lse_row[a : a + chunk, None]).exp_()
            grad = s.sub_(lse_col).exp_().add_(row).mul_(0.5)  # (softmax_row + softmax_col) / 2, in place
            del row
            if eps:
                grad.sub_(eps / n)
            idx = torch.arange(xa.shape[0], device=x.device)
            grad[idx, a + idx] -= 1 - eps
            grad.mul_(g)
            gy = grad @ y
            dscale += (xa * gy).sum()
            dx[a : a + chunk] = scale * gy
            dy += scale * (grad.t() @ xa)
        return dx, dy, dscale, None, None


class RowCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: Tensor, offset: int, eps: float, chunk: int) -> Tensor:
        n = q.shape[0]
        lse = torch.empty(n, dtype=q.dtype, device=q.device)
        for a in range(0, n, chunk):
            lse[a : a + chunk] = torch.logsumexp((q[a : a + chunk] @ k.t()).mul_(scale), dim=1)
        pos = scale * (q * k[offset : offset + n]).sum(-1)
        loss = lse.mean() - (1 - eps) * pos.mean()
        if eps:
            loss = loss - eps * scale * (q.mean(0) @ k.mean(0))
        ctx.save_for_backward(q, k, scale, lse)
        ctx.offset, ctx.eps, ctx.chunk = offset, eps, chunk
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, scale, lse = ctx.saved_tensors
        offset, eps, chunk = ctx.offset, ctx.eps, ctx.chunk
        n, m = q.shape[0], k.shape[0]
        g = grad_out / n
        dq, dk = torch.empty_like(q), torch.zeros_like(k)
        dscale = torch.zeros((), dtype=q.dtype, device=q.device)
        for a in range(0, n, chunk):
            qa = q[a : a + chunk]
            grad = (qa @ k.t()).mul_(scale).sub_(lse[a : a + chunk, None]).exp_()  # softmax rows
            if eps:
                grad.sub_(eps / m)
            idx = torch.arange(qa.shape[0], device=q.device)
            grad[idx, offset + a + idx] -= 1 - eps
            grad.mul_(g)
            gk = grad @ k
            dscale += (qa * gk).sum()
            dq[a : a + chunk] = scale * gk
            dk += scale * (grad.t() @ qa)
        return dq, dk, dscale, None, None, None


class PairwiseSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, offset: int, chunk: int) -> Tensor:
        n = q.shape[0]
        total = torch.zeros((), dtype=q.dtype, device=q.device)
        for a in range(0, n, chunk):
            logits = (q[a : a + chunk] @ k.t()).mul_(scale).add_(bias)
            total += F.softplus(logits).sum()  # -log σ(-s): every pair as a negative
        # the positives: -log σ(s) = softplus(s) - s, i.e. subtract s once per positive pair
        total -= (scale * (q * k[offset : offset + n]).sum(-1) + bias).sum()
        ctx.save_for_backward(q, k, scale, bias)
        ctx.offset, ctx.chunk = offset, chunk
        return total / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, scale, bias = ctx.saved_tensors
        offset, chunk, n = ctx.offset, ctx.chunk, q.shape[0]
        g = grad_out / n
        dq, dk = torch.empty_like(q), torch.zeros_like(k)
        dscale = torch.zeros((), dtype=q.dtype, device=q.device)
        dbias = torch.zeros((), dtype=q.dtype, device=q.device)
        for a in range(0, n, chunk):
            qa = q[a : a + chunk]
            grad = (qa @ k.t()).mul_(scale).add_(bias).sigmoid_()  # d softplus(s)/ds
            idx = torch.arange(qa.shape[0], device=q.device)
            grad[idx, offset + a + idx] -= 1
            grad.mul_(g)
            gk = grad @ k
            dscale += (qa * gk).sum()
            dbias += grad.sum()
            dq[a : a + chunk] = scale * gk
            dk += scale * (grad.t() @ qa)
        return dq, dk, dscale, dbias, None, None


def chunked_clip_loss(x: Tensor, y: Tensor, scale, label_smoothing: float = 0.0, chunk_size: int = 1024) -> Tensor:
    """CLIP's symmetric InfoNCE on one process (x_i pairs with y_i), exact, in row chunks."""
    _check(x, y, 0, chunk_size, label_smoothing)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CLIP pairs x_i with y_i, got {x.shape[0]} images and {y.shape[0]} texts")
    return SymmetricInfoNCE.apply(x, y, _scalar(scale, x, "logit_scale"), float(label_smoothing), int(chunk_size))


def chunked_row_cross_entropy(q: Tensor, k: Tensor, scale, offset: int = 0, label_smoothing: float = 0.0,
                              chunk_size: int = 1024) -> Tensor:
    """Mean cross-entropy of rows of ``scale * q @ k.T`` against columns ``offset + i``, in chunks."""
    _check(q, k, offset, chunk_size, label_smoothing)
    return RowCrossEntropy.apply(q, k, _scalar(scale, q, "logit_scale"), int(offset), float(label_smoothing),
                                 int(chunk_size))


def chunked_pairwise_sigmoid(q: Tensor, k: Tensor, scale, bias, offset: int = 0, chunk_size: int = 1024) -> Tensor:
    """SigLIP's sigmoid loss of rows ``q`` against all ``k``, positives at ``(i, offset + i)``, in chunks."""
    _check(q, k, offset, chunk_size, 0.0)
    return PairwiseSigmoid.apply(q, k, _scalar(scale, q, "logit_scale"), _scalar(bias, q, "logit_bias"),
                                 int(offset), int(chunk_size))


def _scalar(value, like: Tensor, name: str) -> Tensor:
    """A 0-d tensor (a reshape keeps the gradient path to a [1]-shaped parameter)."""
    t = value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=like.dtype, device=like.device)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a single number, got a tensor of shape {tuple(t.shape)}")
    return t.reshape(()).to(like.dtype)


def _check(q: Tensor, k: Tensor, offset: int, chunk_size: int, label_smoothing: float) -> None:
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"expected features [n, d] and [m, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    if offset < 0 or offset + q.shape[0] > k.shape[0]:
        raise ValueError(f"positives at columns {offset}..{offset + q.shape[0] - 1} do not fit {k.shape[0]} candidates")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
