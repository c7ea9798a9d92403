"""fp32 linear layers through oneDNN for training on CPUs where torch's own fp32 GEMM (Intel MKL) is the slower one.

torch runs an fp32 ``F.linear`` and its gradients as MKL GEMMs on the CPU; bf16 ones, and every fp32 layer of
:mod:`clipforge.models.fused_inference`, run as oneDNN kernels. On an AMD EPYC of the Zen 5 generation (family 26,
AVX-512 on full 512-bit units) MKL's fp32 GEMM reached 190-225 GFLOP/s on 2 cores at the shapes of a training step
while oneDNN's reached 380-500 for the forward product (``benchmarks/bench_peak.py``, its oneDNN fp32 column)
and 300-380 for the two gradient products (a one-off timing, thirty-first session), and fp32 training of ``tiny``
went from 1.21x to 1.81x OpenCLIP's samples/s (``bench_train_throughput.py --onednn-linear``, docs/performance.md);
on an AVX2-only EPYC oneDNN's fp32 linear lost to MKL's above
about 160 rows (fused_inference's module docstring). So the switch is measured, not assumed: :func:`onednn_is_faster`
times both on this CPU, and :func:`onednn_fp32_linears` routes ``F.linear`` through :class:`OneDNNLinear` only
where it won.

The three products of a linear layer ``y = x W^T + b`` (x: [M, K], W: [N, K]), each one oneDNN linear
(``torch.ops.mkldnn._linear_pointwise(a, w, bias)`` = ``a w^T + bias``):

- forward ``y = x W^T + b``;
- input gradient ``dx = dy W``: a linear with the weight ``W^T`` (a [K, N] copy of the weight, small);
- weight gradient ``dW = dy^T x``: oneDNN was fastest with the smaller of N and K as the output rows, so
  ``(x^T dy)^T`` where K <= N and ``dy^T x`` otherwise (transposed views, no copies of the activations);
- bias gradient ``db = sum of dy over rows``.

Same arithmetic as ``F.linear`` in fp32 (no reduced precision: results agree to fp32 rounding, the sums in another
order); tests ``tests/models/test_onednn_linear.py`` check values and all three gradients against ``F.linear``
in float64.

The switch is a :class:`torch.overrides.TorchFunctionMode`, so the model code is unchanged: ``F.linear`` calls on
fp32 CPU tensors outside autocast with at least :data:`MIN_ROWS` rows take this path, everything else (bf16,
autocast, other devices, float64, fewer rows, other functions) runs as before. ``clipforge train`` turns it on for
fp32 training where :func:`onednn_is_faster` says so (in every rank that ``distributed.nproc`` starts too), and
``clipforge eval``, ``index`` and ``adapt`` for their fp32 work (``--fp32-linear``); from Python,
``with onednn_fp32_linears(): train(cfg)``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

MIN_SPEEDUP = 1.3  # onednn_is_faster: oneDNN must beat F.linear by this much on every product timed
# fewer rows than this stay on F.linear: a single row (one token decoded at a time, one query) ran at 0.6-1.0x of
# F.linear through oneDNN on the Zen 5 EPYC (widths 512-2048, one thread), 4 rows at 1.0-1.4x, 16 at 1.5-3.8x
MIN_ROWS = 8
_SWITCH = threading.local()  # .depth: how many onednn_fp32_linears(True) this thread is inside


def onednn_linear_kernel(a: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a w^T + bias`` as one oneDNN kernel (a: [M, K], w: [N, K]); also what ``benchmarks/bench_peak.py`` times."""
    return torch.ops.mkldnn._linear_pointwise(a, w, bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with the forward product and both gradient products as oneDNN kernels
    (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # the same tensor where it is contiguous already
        ctx.save_for_backward(rows, weight)
        ctx.has_bias, ctx.in_shape = bias is not None, x.shape
        out = onednn_linear_kernel(rows, weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, weight = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0]).contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = onednn_linear_kernel(g, weight.t().contiguous()).view(ctx.in_shape)
        if ctx.needs_input_grad[1]:
            n, k = weight.shape
            if k <= n:  # the smaller dimension as oneDNN's output rows (module docstring)
                dw = onednn_linear_kernel(rows.t(), g.t()).t().contiguous()
            else:
                dw = onednn_linear_kernel(g.t(), rows.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db


def _takes_onednn_path(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return (x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
            and x.dim() >= 2 and weight.dim() == 2 and (bias is None or bias.dtype == torch.float32)
            and not torch.is_autocast_enabled("cpu") and x.numel() > 0 and x.numel() // x.shape[-1] >= MIN_ROWS)


class _OneDNNLinearMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _takes_onednn_path(x, weight, bias):
                return OneDNNLinear.apply(x, weight, bias)
        return func(*args, **kwargs)


@contextlib.contextmanager
def onednn_fp32_linears(enabled: bool = True) -> Iterator[None]:
    """Inside: fp32 ``F.linear`` on the CPU runs as :class:`OneDNNLinear` (module docstring); ``enabled=False``
    changes nothing. In this thread only (as every TorchFunctionMode). A new process does not inherit it by itself;
    the ranks that :func:`clipforge.train.distributed.launch` starts (``distributed.nproc``) enter it when their
    parent was inside (:func:`onednn_linears_active`)."""
    if not enabled:
        yield
        return
    _SWITCH.depth = getattr(_SWITCH, "depth", 0) + 1
    try:
        with _OneDNNLinearMode():
            yield
    finally:
        _SWITCH.depth -= 1


def onednn_linears_active() -> bool:
    """Whether this thread is inside :func:`onednn_fp32_linears` (enabled)."""
    return getattr(_SWITCH, "depth", 0) > 0


def call_with_onednn_linears(fn, *args):
    """``fn(*args)`` inside :func:`onednn_fp32_linears`: what a started process runs to take its launcher's switch."""
    with onednn_fp32_linears():
        return fn(*args)


@functools.cache
def onednn_is_faster(rows: int = 4096, width: int = 256, repeats: int = 5) -> bool:
    """Whether oneDNN's fp32 linear beats ``F.linear`` on this CPU by :data:`MIN_SPEEDUP` for each of a training
    step's three products (forward, input gradient, weight gradient) at ``rows`` x ``width`` -> 2 * ``width``:
    timed here, alternating, best of ``repeats`` (about 0.1 s once per process; cached)."""
    if not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=gen)
    w = torch.randn(2 * width, width, generator=gen)
    g = torch.randn(rows, 2 * width, generator=gen)
    pairs = [  # (torch's product, oneDNN's) for the forward, the input gradient and the weight gradient
        (lambda: F.linear(x, w), lambda: onednn_linear_kernel(x, w)),
        (lambda: g @ w, lambda: onednn_linear_kernel(g, w.t().contiguous())),
        (lambda: g.t() @ x, lambda: onednn_linear_kernel(x.t(), g.t()).t().contiguous()),
    ]
    try:
        for plain, fast in pairs:
            best = [float("inf"), float("inf")]
            for _ in range(repeats):
                for i, fn in enumerate((plain, fast)):
                    t = time.perf_counter()
                    fn()
                    best[i] = min(best[i], time.perf_counter() - t)
            if best[0] < MIN_SPEEDUP * best[1]:
                log.debug("oneDNN fp32 linear not faster here (%.2fx)", best[0] / best[1])
                return False
    except RuntimeError as e:  # a build without the oneDNN linear op
        log.debug("oneDNN fp32 linear unavailable: %s", e)
        return False
    return True
