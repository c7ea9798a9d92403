"""A CLIP image tower compiled for inference: ``torch.compile`` (inductor) with frozen weights, one batch size.

``CompiledImageEncoder(model, batch_size)(pixels)`` returns what ``model.encode_image(pixels)`` returns, for any
number of images: they are cut into chunks of ``batch_size`` and the last chunk is padded with zero tensors, so one
compiled graph serves every call and nothing recompiles when the last batch of a collection is short. The rows
that come back are the input's; the padding rows are dropped.

Why this helps: inductor's *freezing* (``torch._inductor.config.freezing``) treats the weights as constants, so the
linear layers' weights are re-laid out once, at compile time, in the blocked format the oneDNN kernels want
(AMX tiles for bf16), instead of on every call, and the elementwise work around the GEMMs (LayerNorm, GELU, bias,
the casts) is fused into generated C++ loops. Measured on a 2-core Xeon with AMX-BF16 (docs/performance.md,
"Compiled image tower"): ViT-B-32 images 1.17x the eager ``to_inference`` model in bf16 at batch 32 and 1.31x at
batch 1; in fp32 1.08x and 1.40x.

Why a separate object and not a flag on :class:`~clipforge.models.clip.CLIP`: freezing captures the weights as
they are at the first call, so it is only correct while they never change; :meth:`CLIP.to_inference` (parameters
frozen, ``train()`` refused) is the promise of that, and the compiled encoder requires such a model (loading other
weights into it afterwards, or editing them in place, is not seen by the graph: build a new encoder). Training's
``torch.compile`` (``models/compile.py``) keeps the weights as graph inputs instead. Texts are not compiled: their
batches are trimmed to the longest text (a new shape per length), and they are already the faster half
(docs/performance.md).

If dynamo or inductor fail (no C++ compiler, an unsupported op), the first call warns once with the reason and the
encoder runs eagerly from then on: the embeddings are the same, only slower.

Every call runs under ``torch.inference_mode`` on a fresh copy of each chunk, whatever the caller's grad mode, so
dynamo's guards (grad and inference mode, whether the input is an inference tensor) are the same on every call and
one graph serves them all. The compiled graphs are cached on ``CLIP.encode_image``'s code, shared by every encoder
of the process: dynamo keeps at most ``torch._dynamo.config.recompile_limit`` (8) of them and runs eagerly beyond
that, so build few encoders per process (one per model and batch size), or call ``torch._dynamo.reset()`` between.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Callable

import torch
from torch import Tensor

from ..errors import ConfigError
from .compile import is_compiler_error

BACKEND = "inductor"  # the tests also use "aot_eager" (no C++ code generation, no freezing)
log = logging.getLogger(__name__)


def _freezing():
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


class CompiledImageEncoder:
    """``model.encode_image`` through ``torch.compile`` with frozen weights, at a fixed ``batch_size``.

    ``model``: a CLIP prepared by ``to_inference`` (any dtype). ``batch_size``: the one batch the graph is compiled
    for (calls with more images run in chunks of it, fewer are padded with zero tensors whose rows are dropped).
    ``backend``: ``torch.compile``'s (a name or a backend callable); inductor compiles with ``freezing``."""

    def __init__(self, model, batch_size: int, backend: str | Callable | None = None):
        if getattr(model, "inference_dtype", None) is None:
            raise ConfigError("a compiled image encoder freezes the weights into the graph, so it needs a model "
                              "prepared for inference: call model.to_inference() (or to_inference('bf16')) first")
        if batch_size < 1:
            raise ConfigError(f"the compiled encoder's batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.backend = backend or BACKEND
        self.failed: str | None = None  # why compilation fell back to eager, once it has
        self.compile_seconds: float | None = None  # the first call's compilation, once done
        self._compiled = torch.compile(model.encode_image, backend=self.backend, dynamic=False)

    @property
    def cfg(self):
        return self.model.cfg

    def _encode(self, chunk: Tensor) -> Tensor:
        if self.failed is None:
            first = self.compile_seconds is None
            t0 = time.perf_counter()
            try:
                # inductor reads freezing from its global config when it compiles (at the first call): the
                # per-compile options={"freezing": True} of torch.compile was measured not to take effect (the
                # generated code kept addmm on unfrozen weights), so the setting is patched around each call
                with _freezing():
                    out = self._compiled(chunk)
                if first:
                    self.compile_seconds = time.perf_counter() - t0
                    log.info("compiled the image tower for batches of %d in %.0f s", self.batch_size,
                             self.compile_seconds)
                return out
            except Exception as e:  # noqa: BLE001 - only compiler errors are swallowed
                if not is_compiler_error(e):
                    raise
                cause = getattr(e, "inner_exception", None) or e  # BackendCompilerFailed wraps the real error
                reason = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
                self.failed = f"{type(cause).__name__}: {reason}"
                warnings.warn(f"torch.compile of the image tower failed ({self.failed}); embedding continues "
                              "eagerly (the same embeddings, without the compiled speed-up). Embed without the "
                              "compiled encoder (leave out clipforge embed --compile) to skip the attempt.",
                              RuntimeWarning, stacklevel=4)
        return self.model.encode_image(chunk)

    def __call__(self, pixels: Tensor) -> Tensor:
        """The embeddings of ``pixels`` ([N, 3, H, W], N >= 1), as ``model.encode_image`` returns them."""
        if pixels.ndim != 4 or pixels.shape[0] == 0:
            raise ValueError(f"expected a non-empty batch of images [N, 3, H, W], got shape {tuple(pixels.shape)}")
        out = []
        with torch.inference_mode():  # the same guards on every call (module docstring)
            for i in range(0, pixels.shape[0], self.batch_size):
                chunk = pixels[i : i + self.batch_size]
                n = chunk.shape[0]
                pad = chunk.new_zeros(self.batch_size - n, *chunk.shape[1:])  # the same shape every call
                out.append(self._encode(torch.cat([chunk, pad]))[:n])
            result = torch.cat(out)
        return result.clone()  # outside inference mode: a normal tensor for the caller, not an inference tensor

    encode_image = __call__  # so that code written for a model (embed_local) takes the encoder as it is
