"""``distributed.strategy=fsdp``: the model's weights, gradients and optimizer state sharded over the ranks with
PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

What is sharded, and what is not:

- every transformer block (:class:`clipforge.models.transformer.Block`, CoCa's cross-attention blocks) is one
  FSDP unit: its parameters are gathered just before the block runs and freed after (``reshard_after_forward``,
  default true), gathered again in backward, and its gradients are reduce-scattered (averaged) as soon as backward
  has passed it, so communication overlaps computation;
- every tower (``visual``, ``text``, CoCa's ``decoder``) is one more unit holding the rest of the tower
  (embeddings, norms, projections). The towers are entered not only through ``forward`` but also through
  ``forward_tokens``, ``pool`` and ``project`` (token-level loss terms, CoCa); those methods are registered with
  ``register_fsdp_forward_method`` so that they gather the tower's parameters too;
- the model's own scalars (``logit_scale``, ``logit_bias``), a CLOC region head and the loss terms' heads stay
  replicated: they are a few thousand numbers, and the loop also reads them outside any forward. Their gradients
  are averaged by :meth:`clipforge.train.distributed.Dist.average_gradients`, which leaves sharded ones alone.
  The model root is therefore not an FSDP unit (simplification: FSDP's own examples shard the root too).

With ``precision=bf16`` the units hold bf16 copies for compute and reduce gradients in fp32
(``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``); the sharded master weights and the
optimizer state stay fp32. ``distributed.cpu_offload=true`` keeps the shards and optimizer state in host memory
(``CPUOffloadPolicy``; CUDA only: on a CPU run they are in host memory already).

An EMA teacher (DeGLA) stays a full, unsharded copy on every rank; :meth:`clipforge.losses.EMATeacher.update`
gathers each sharded weight to update it. Evaluation and the returned model use :func:`full_model`, a plain
(unsharded) copy gathered on every rank.

One process with ``strategy=fsdp`` does not shard (there is nothing to shard over) but writes the same sharded
checkpoints (:mod:`clipforge.train.checkpoint`), so a run can move between 1 and N processes.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Callable

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..errors import ConfigError

logger = logging.getLogger(__name__)

TOWERS = ("visual", "text", "decoder")  # the towers a clipforge model may have (decoder: CoCa)
TOWER_METHODS = ("forward_tokens", "pool", "project")  # tower entry points other than forward


def _blocks(tower: nn.Module) -> list[nn.Module]:
    from ..models.coca import CrossBlock
    from ..models.transformer import Block

    return [m for m in tower.modules() if isinstance(m, (Block, CrossBlock))]


def wrappable(model: nn.Module) -> str:
    """Why ``model`` cannot be sharded by :func:`shard_model` ("" if it can)."""
    towers = [name for name in TOWERS if isinstance(getattr(model, name, None), nn.Module)]
    if "visual" not in towers or "text" not in towers:
        return f"a {type(model).__name__} has no image and text towers (visual, text)"
    for name in towers:
        if not _blocks(getattr(model, name)):
            return (f"its {name} tower ({type(getattr(model, name)).__name__}) has no clipforge transformer blocks "
                    "to shard (a MobileCLIP convolutional tower or a Hugging Face text encoder)")
    if getattr(model.cfg, "compile", False):
        return "it is compiled (model_overrides.compile=true); compile and fsdp are not combined here"
    return ""


def check_wrappable(model: nn.Module) -> None:
    why = wrappable(model)
    if why:
        raise ConfigError(f"distributed.strategy=fsdp cannot shard this model: {why}. Train it with "
                          "distributed.strategy=ddp (replicated weights)")


def shard_model(model: nn.Module, device: torch.device, world_size: int, precision: str,
                reshard_after_forward: bool = True, cpu_offload: bool = False) -> None:
    """Shard ``model`` in place over the ``world_size`` ranks of the default process group (module docstring).
    Every rank must hold the same weights first (the loop broadcasts rank 0's)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    check_wrappable(model)
    # ``pool`` returns the class token as a view of the tokens; nothing modifies it in place, which is what the
    # warning is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if cpu_offload and device.type != "cuda":
        raise ConfigError("distributed.cpu_offload=true moves sharded weights from the GPU to host memory; this run "
                          f"computes on {device.type}, where they are in host memory already: leave it false")
    mesh = init_device_mesh(device.type, (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=True) if cpu_offload else OffloadPolicy()
    options = dict(mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward)
    units = 0
    for name in TOWERS:
        tower = getattr(model, name, None)
        if not isinstance(tower, nn.Module):
            continue
        for block in _blocks(tower):
            fully_shard(block, **options)
            units += 1
        fully_shard(tower, **options)
        units += 1
        for method in TOWER_METHODS:
            if callable(getattr(tower, method, None)):
                register_fsdp_forward_method(tower, method)
    sharded = sum(p.numel() for p in model.parameters() if isinstance(p, DTensor))
    total = sum(p.numel() for p in model.parameters())
    logger.info("fsdp: %d units over %d ranks; %.1f%% of the model's parameters sharded", units, world_size,
                100 * sharded / max(total, 1))


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (the tensor itself when it is replicated)."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` (L2, ``max_norm / (norm + 1e-6)`` clamped at 1) over parameters of
    which some are sharded: the squares of the local shards are summed over ranks, the replicated ones counted
    once. Returns the total norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    replicated = [g for g in grads if not isinstance(g, DTensor)]
    device = (local(grads[0]) if grads else torch.zeros(())).device
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for g in sharded:
        squares += local(g).double().pow(2).sum()
    if sharded and torch_dist.is_initialized():
        torch_dist.all_reduce(squares)
    for g in replicated:
        squares += g.double().pow(2).sum()
    total = math.sqrt(float(squares))
    coef = min(max_norm / (total + 1e-6), 1.0)
    if coef < 1.0:
        for g in grads:
            local(g).mul_(coef)
    return total


def full_model(model: nn.Module) -> nn.Module:
    """A plain (unsharded) copy of a sharded model on every rank (a collective: every rank calls it);
    ``model`` itself when it is not sharded."""
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..models.factory import model_from_config

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    plain = model_from_config(model.cfg)
    plain.set_grad_checkpointing(False)
    plain.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    for p, q in zip(model.parameters(), plain.parameters()):
        q.requires_grad_(p.requires_grad)
    return plain.to(local(next(model.parameters())).device).train(model.training)


# ------------------------------------------------------------------ the tensors of a sharded checkpoint


class Trainables(nn.Module):
    """The model and the loss terms (whose heads train with it) as one module, so that the optimizer's state is
    keyed by stable names (``model.visual...``, ``loss_terms....``) in a sharded checkpoint."""

    def __init__(self, model: nn.Module, loss_terms: nn.Module):
        super().__init__()
        self.model = model
        self.loss_terms = loss_terms


def checkpoint_tensors(model: nn.Module, trainables: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``{"model": ..., "optimizer": ...}``: this rank's shards (or the full tensors of a replicated model), keyed by
    parameter names, for ``torch.distributed.checkpoint``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(trainables, optimizer)}


def restore_checkpoint_tensors(ckpt, model: nn.Module, trainables: nn.Module, optimizer: torch.optim.Optimizer,
                               load: Callable) -> None:
    """Read a sharded checkpoint's weights and optimizer state into this rank's (sharded or replicated) model and
    optimizer, whatever number of ranks wrote it. ``load(ckpt, tensors)`` reads in place
    (:func:`clipforge.train.checkpoint.load_sharded`). Parameters without optimizer state in the checkpoint (they
    never received a gradient) get none here either."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    saved = set(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    tensors = checkpoint_tensors(model, trainables, optimizer)  # initializes the optimizer's state (zero steps)
    state = tensors["optimizer"]["state"]
    for name in [n for n in state if not any(k.startswith(f"optimizer.state.{n}.") for k in saved)]:
        del state[name]
    load(ckpt, tensors)
    set_model_state_dict(model, tensors["model"])
    optimizer.state.clear()
    set_optimizer_state_dict(trainables, optimizer, tensors["optimizer"])
