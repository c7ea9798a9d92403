"""``torch.compile`` of the towers for training (``CLIPConfig.compile``), with a fallback.

Turned on per model: ``create_model("tiny", compile=True)``, or ``model_overrides.compile=true``
in a training config, so the training loop does not change. Only the training forward (module
in train mode, gradients on) goes through the compiled tower; evaluation and the no-grad
passes of gradient accumulation stay eager, because each of those would otherwise cost a
recompilation (grad mode is part of dynamo's guards) for a pass that runs rarely.

One compiled function, ``_call_tower(module, *args)``, serves every tower and every model:
with dynamo's default of treating module parameters as graph inputs, towers of the same
architecture share one compiled graph, and nothing is stored on the modules, so
``copy.deepcopy`` (the EMA teacher) and ``state_dict`` keys are unaffected.

If dynamo or inductor fail (no C++ compiler, an unsupported op), the first call warns once
with the reason and every later call runs eagerly: a run never dies for want of a compiler.
A compile error raised by the *backward* graph, which inductor builds at the first
``backward()``, cannot be caught here; set ``compile=false`` if that happens.

On the 2-core development CPU inductor fuses the elementwise work around the GEMMs
(LayerNorm, GELU, bias adds, the autocast casts, the softmax) into generated C++ loops; the
first training step pays the compilation (about a minute for ``tiny``; see
docs/performance.md for measured compile times and speed-ups).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

BACKEND = "inductor"  # the tests use "aot_eager": dynamo + autograd graphs, no C++ codegen
_compiled = None
_failed: str | None = None  # the reason, once compilation has failed in this process


def _call_tower(module: nn.Module, *args):
    return module(*args)


def is_compiler_error(e: BaseException) -> bool:
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler, OperatorIssue

    return isinstance(e, (TorchDynamoException, CppCompileError, InvalidCxxCompiler, OperatorIssue))


def compile_failed() -> str | None:
    """Why ``torch.compile`` fell back to eager in this process, or None if it did not."""
    return _failed


def call_compiled(module: nn.Module, *args):
    """``module(*args)`` through ``torch.compile``, or eagerly once compilation has failed."""
    global _compiled, _failed
    if _failed is None:
        try:
            if _compiled is None:
                _compiled = torch.compile(_call_tower, backend=BACKEND)
            return _compiled(module, *args)
        except Exception as e:  # noqa: BLE001 - only compiler errors are swallowed, see below
            if not is_compiler_error(e):
                raise
            _failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            warnings.warn(f"torch.compile of the {type(module).__name__} failed ({_failed}); training continues "
                          "eagerly (same results, without the compiled speed-up). Set compile=false in the model "
                          "config (model_overrides.compile=false) to skip the attempt.", RuntimeWarning, stacklevel=2)
    return module(*args)
