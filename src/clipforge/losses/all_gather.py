"""A differentiable all-gather for the global losses (``clipforge.losses.gather.gather`` calls it with several
processes): every process gets all processes' rows, and the gradient of each row comes back, summed over the
processes that used it, to the process that owns the row. The operation ``torch.distributed.nn.all_gather``
performs; why this one is written here is in the class docstring.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums each process's slice of the gradient over all processes.

    Forward: ``all_gather_single`` of the local [B, ...] rows into [world * B, ...], rank r's rows at
    ``r * B``. Backward: the gradient of the gathered tensor is summed over processes (``all_reduce``) and each
    process keeps its own rows, the reduce-scatter that torch's differentiable all-gathers do (gloo has no
    reduce-scatter, so it is an all-reduce and a slice here, on every backend).

    Written here rather than taken from torch, with both collectives blocking, because of what torch 2.13
    offers: ``torch.distributed.nn.all_gather`` warns that it is deprecated, and its replacement,
    ``_functional_collectives.all_gather_single_autograd`` (private, asynchronous), corrupts the heap on
    gloo when several gathers are in flight at once, as a loss that gathers image, text and extra features
    has them: a 2-process script gathering 12 small tensors per step crashed ("malloc(): unaligned tcache chunk
    detected", or a segmentation fault) in all 11 of its runs of 200-300 steps, and in none of 6 when each
    gather was waited for before the next, nor in 5 with this class (thirtieth session, an AVX2-only EPYC; test
    test_many_gathers_in_flight_match_one_process)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rows, ctx.rank = x.shape[0], rank
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        # all_gather_single is torch 2.13's name for all_gather_into_tensor, which it deprecates (2.11 has only that)
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        all_gather(out, x)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        total = grad.contiguous().clone()  # all_reduce works in place; autograd's gradient is not ours to change
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]
