"""Fused CPU kernels for a model prepared with :meth:`CLIP.to_inference`: the eager fast path of embedding.

A profile of ViT-B-32's bf16 image tower at batch 32 (docs/performance.md, "Fused inference layers") spent a
large share of its time around the matrix products rather than in them: the exact GELU as its own pass over the
[B, N, 4C] activations and the copy of the broadcast bias into every ``addmm`` output before the product.
transformers and OpenCLIP pay the same. :func:`fuse_for_inference` turns every ``nn.Linear`` of the transformer
blocks into a :class:`FusedLinear`, which calls oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the
kernel inductor emits for frozen linear layers) on a weight reordered once into oneDNN's blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, cached on first use), with the bias, and for the first MLP layer
the GELU, applied in the kernel's epilogue. Attention is left as it is: the batched-matmul form the training path
uses for short sequences was tried here too and was no faster than SDPA at inference with two threads, and slower
for single short texts.

These are private PyTorch operators (``torch.ops.mkldnn``), which is why clipforge checks them against
``F.linear`` once per dtype when it fuses and keeps the plain layers, with one warning, where an operator is
missing or disagrees. Nothing changes in the state dict (the fused modules keep ``weight`` and ``bias`` under
the same names; the reordered copy is a cache that is neither saved nor copied), and under tracing, ONNX export
and ``torch.compile`` :class:`FusedLinear` runs ``F.linear`` and the activation (inductor's freezing makes the
same fused kernels from them for the compiled encoder). Only CPU models in float32 or bfloat16 are fused, bf16
only where oneDNN has native bf16 kernels (AVX-512 BF16 or AMX).

On a CPU without AVX-512 (AVX2 only) oneDNN's fp32 linear is faster than ``F.linear`` only for short inputs: in
fp32 with two threads on an AVX2-only AMD EPYC (thirtieth session, each layer of ViT-B-32 timed fused and plain
in alternation, 5 pairs) it was 1.16-2.10x faster at 6 to 64 rows and mostly 1.0-1.2x up to 160, but 0.91-1.00x
at 200 rows and 0.74-0.98x at 400 to 4,608 (an image batch of 32 is 1,600 rows; the first MLP layer with its GELU
lost most, 0.74x). There a fused layer hands inputs of more than :data:`AVX2_FP32_MAX_ROWS` rows to ``F.linear``
(``FusedLinear.max_rows``); with AVX-512 the fused layer won at batch 32 too (docs/performance.md) and has no
limit.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transformer import Attention, Block

log = logging.getLogger(__name__)

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
AVX2_FP32_MAX_ROWS = 160  # above this many rows F.linear beats oneDNN's fp32 linear on AVX2-only CPUs (docstring)
# activation -> (oneDNN post-op, its algorithm): the activations the kernel applies exactly as PyTorch does
_POST_OPS = {"none": ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


def _plain_operators() -> bool:
    """True while the model is traced, exported or compiled: those must see ``F.linear``."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export() or \
        torch.compiler.is_compiling()


class FusedLinear(nn.Module):
    """``act(x @ weight.T + bias)`` in one oneDNN call (module docstring); ``act`` is ``"none"``, ``"gelu"``
    (exact, erf) or ``"gelu_tanh"``. Holds the ``weight`` and ``bias`` parameters of the ``nn.Linear`` it
    replaces (same state-dict keys and tensors). ``max_rows``: inputs of more rows (all dimensions but the last)
    take the plain operators, where they are faster on this CPU (None: no limit; :func:`fuse_for_inference` sets
    it from :func:`row_limit`)."""

    def __init__(self, linear: nn.Linear, act: str = "none", max_rows: int | None = None):
        super().__init__()
        if act not in _POST_OPS:
            raise ValueError(f"FusedLinear: unknown activation '{act}'; use one of {sorted(_POST_OPS)}")
        self.weight, self.bias = linear.weight, linear.bias
        self.act, self.max_rows = act, max_rows
        self._packed: tuple | None = None  # (weight version, data pointer, reordered weight): a cache

    def __getstate__(self) -> dict:
        # oneDNN's reordered tensor has no storage to copy or pickle; the copy reorders again on first use
        return {**self.__dict__, "_packed": None}

    def _kernel_weight(self) -> Tensor:
        w = self.weight
        key = (w._version, w.data_ptr())
        if self._packed is None or self._packed[:2] != key:
            self._packed = (*key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), None))
        return self._packed[2]

    def plain(self, x: Tensor) -> Tensor:
        """The same result with PyTorch's public operators."""
        y = F.linear(x, self.weight, self.bias)
        if self.act == "gelu":
            return F.gelu(y)
        return F.gelu(y, approximate="tanh") if self.act == "gelu_tanh" else y

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or x.dtype != self.weight.dtype or x.dtype not in _KERNEL_DTYPES or x.requires_grad
                or _plain_operators() or (self.max_rows is not None and x.numel() > self.max_rows * x.shape[-1])):
            return self.plain(x)
        attr, algorithm = _POST_OPS[self.act]
        return torch.ops.mkldnn._linear_pointwise(x, self._kernel_weight(), self.bias, attr, [], algorithm)

    def extra_repr(self) -> str:
        limit = "" if self.max_rows is None else f", max_rows={self.max_rows}"
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, act={self.act}{limit}"


def _activation_name(act: nn.Module) -> str | None:
    """The post-op name of an MLP activation the kernel computes exactly, else None (kept as its own module)."""
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    return None


@functools.cache
def _kernels_check(dtype: torch.dtype) -> str | None:
    """None when the fused kernels run ``dtype`` here, else why not (checked once per dtype and process)."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch has no oneDNN"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no native bf16 kernels (AVX-512 BF16 or AMX)"
    try:  # one small layer, both kinds of epilogue, against the public operators
        with torch.random.fork_rng(devices=[]):  # the caller's random stream is not advanced by this check
            lin = nn.Linear(16, 24).to(dtype)
            x = torch.randn(2, 3, 16).to(dtype)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        with torch.no_grad():
            for act in ("none", "gelu"):
                fused = FusedLinear(lin, act)
                if not torch.allclose(fused(x).float(), fused.plain(x).float(), atol=tol, rtol=tol):
                    return f"oneDNN's linear ({act}) disagrees with F.linear here"
    except (RuntimeError, AttributeError, NotImplementedError) as e:  # operator missing or unsupported
        return f"oneDNN's linear failed here ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None


def row_limit(dtype: torch.dtype) -> int | None:
    """The ``max_rows`` of the fused layers for ``dtype`` on this CPU: :data:`AVX2_FP32_MAX_ROWS` for fp32 where
    torch reports no AVX-512 (AVX2 and below, and CPUs of other architectures, where it was not measured), None
    otherwise (module docstring)."""
    if dtype == torch.float32 and torch.backends.cpu.get_cpu_capability() != "AVX512":
        return AVX2_FP32_MAX_ROWS
    return None


def fuse_for_inference(model: nn.Module) -> int:
    """Swap the linear layers of every transformer block of ``model`` (in place) for :class:`FusedLinear`;
    returns how many blocks were fused. 0, with the model plain, for a model off the CPU or in a dtype other than
    float32/bfloat16, and (with a log line saying why) where the kernels cannot run."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or param.dtype not in _KERNEL_DTYPES:
        unfuse(model)  # e.g. fused in float32 by an earlier to_inference, now float64 or on a GPU
        return 0
    why = _kernels_check(param.dtype)
    if why is not None:
        unfuse(model)  # a model fused earlier in another dtype (to_inference called twice) goes back to plain
        log.warning("fused inference layers not used (%s): embedding with the plain layers, same results, "
                    "slower", why)
        return 0
    fused, rows = 0, row_limit(param.dtype)
    for block in [m for m in model.modules() if type(m) is Block]:
        attn = block.attn
        if type(attn) is Attention and type(attn.in_proj) is nn.Linear:
            attn.in_proj = FusedLinear(attn.in_proj, max_rows=rows)
            attn.out_proj = FusedLinear(attn.out_proj, max_rows=rows)
        mlp = block.mlp
        if (isinstance(mlp, nn.Sequential) and len(mlp) == 3 and type(mlp[0]) is nn.Linear
                and type(mlp[2]) is nn.Linear):
            act = _activation_name(mlp[1])
            if act is not None:  # the activation moves into the first layer's kernel; Identity keeps the indices
                mlp[0], mlp[1] = FusedLinear(mlp[0], act, max_rows=rows), nn.Identity()
            else:  # QuickGELU and others stay their own module after the first layer
                mlp[0] = FusedLinear(mlp[0], max_rows=rows)
            mlp[2] = FusedLinear(mlp[2], max_rows=rows)
        fused += 1
    return fused


def _linear(fused: FusedLinear) -> nn.Linear:
    lin = nn.Linear(fused.weight.shape[1], fused.weight.shape[0], bias=fused.bias is not None,
                    device="meta")  # no fresh weights: the fused layer's tensors are put in below
    lin.weight, lin.bias = fused.weight, fused.bias
    return lin


def unfuse(model: nn.Module) -> int:
    """Undo :func:`fuse_for_inference` in place (the plain ``nn.Linear`` and activation modules over the same
    tensors): for comparing the two paths, or to run PyTorch's public operators only. Returns how many
    blocks it changed."""
    changed = 0
    for block in [m for m in model.modules() if type(m) is Block]:
        touched = False
        if type(block.attn) is Attention and type(block.attn.in_proj) is FusedLinear:
            block.attn.in_proj, block.attn.out_proj = _linear(block.attn.in_proj), _linear(block.attn.out_proj)
            touched = True
        mlp = block.mlp
        if isinstance(mlp, nn.Sequential) and len(mlp) == 3 and type(mlp[0]) is FusedLinear:
            if mlp[0].act != "none":
                mlp[1] = nn.GELU(approximate="tanh" if mlp[0].act == "gelu_tanh" else "none")
            mlp[0], mlp[2] = _linear(mlp[0]), _linear(mlp[2])
            touched = True
        changed += touched
    return changed
