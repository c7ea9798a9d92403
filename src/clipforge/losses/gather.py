"""Gathering features across processes for the global contrastive loss.

With ``world_size == 1`` every function returns its input unchanged, so terms are written
once and work both on one CPU and under ``torch.distributed``. Gradients flow through the
gather (:class:`clipforge.losses.all_gather.AllGatherWithGrad`, a blocking all-gather whose backward
sums each process's rows' gradients over all processes), which is what the global loss needs: every
process's features receive gradient from every other process's logits.
"""
from __future__ import annotations

from torch import Tensor


def gather(x: Tensor, rank: int = 0, world_size: int = 1) -> Tensor:
    """Concatenate ``x`` ([B, ...]) from all processes along dim 0, keeping gradients (each process's rows get
    the gradient summed over all processes: :class:`clipforge.losses.all_gather.AllGatherWithGrad`, which replaces
    torch's functional all-gather here because that one crashed with several gathers in flight on gloo)."""
    if world_size <= 1:
        return x
    import torch.distributed as dist

    from .all_gather import AllGatherWithGrad

    if not dist.is_initialized():
        raise RuntimeError("world_size > 1 but torch.distributed is not initialized")
    return AllGatherWithGrad.apply(x)


def local_offset(batch_size: int, rank: int) -> int:
    """Index of this process's first sample in the gathered (global) batch."""
    return batch_size * rank
