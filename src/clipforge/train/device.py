"""Where a run computes, and every choice that follows from it, made in one place.

:func:`device_plan` turns the ``device`` and ``precision`` options (and what this machine has) into a
:class:`DevicePlan`; the training loop, the process group and the CLI commands that encode read their
device-dependent settings from it and from nowhere else:

=====================  =========================  ==========================  ===========================
choice                 CPU                        CUDA                        MPS
=====================  =========================  ==========================  ===========================
``device=auto``        when CUDA is absent        when CUDA is available      never chosen by ``auto``
precision=bf16         bf16 autocast              bf16 autocast; fp16 +       bf16 autocast if supported,
                                                  GradScaler on GPUs without  else fp16 autocast
                                                  bf16 (logged)
precision=fp16         refused (use bf16)         fp16 autocast + GradScaler  fp16 autocast + GradScaler
precision=fp32         no autocast                no autocast, TF32 matmuls   no autocast
precision=auto         bf16 where the CPU has     bf16, or fp16 + GradScaler  fp32
                       oneDNN's bf16 kernels      on GPUs without bf16
                       (AVX-512 / AMX), else fp32
pinned memory,         no                         yes                         no
non_blocking copies
TF32 matmuls           n/a                        allowed                     n/a
process-group backend  gloo                       nccl                        gloo
CPU short_attention    yes (models/transformer)   no: SDPA's fused kernels    no: SDPA
=====================  =========================  ==========================  ===========================

Availability is read from torch unless it is passed in (``cuda_available``, ``cuda_count``,
``bf16_supported``, ``mps_available``, ``cpu_bf16_fast``): tests exercise the whole table on a machine without a GPU.
A device that is asked for and absent fails here, at start-up, before any data is read.

Why ``auto`` and the CPU note: oneDNN runs bf16 GEMMs with native instructions on CPUs with AVX-512 (emulated
with AVX-512 integer ops, fast enough) or AVX-512 BF16 / AMX; on an AVX2-only CPU it falls back to a slow reference
path. Measured on an AMD EPYC with AVX2 only (2 cores, ``benchmarks/bench_peak.py``, docs/performance.md): best
bf16 GEMM 18 GFLOP/s against 105 GFLOP/s fp32. ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is the test PyTorch
itself uses for oneDNN's bf16 paths; there is no public API for it (checked in torch 2.13), so a failing call counts
as "no fast bf16". precision=bf16 on such a CPU still trains in bf16 (results must not depend on the machine
silently) but the plan's note says how much it costs and to use fp32 or auto.

The CUDA and MPS columns were not run on a GPU in the session that wrote them (no GPU was available);
they are what PyTorch documents for those devices.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


class DeviceUnavailable(ConfigError):
    """The configured device is not on this machine (or not in this build of PyTorch)."""


@dataclass(frozen=True)
class DevicePlan:
    """Every device-dependent choice of a run; see the module docstring's table."""

    device: torch.device
    precision: str  # what was asked for ("auto" stays "auto"; ``effective_precision`` says what it became)
    autocast_dtype: torch.dtype | None  # None: no autocast (fp32)
    grad_scaler: bool  # fp16: scale the loss, unscale before clipping (torch.amp.GradScaler)
    pin_memory: bool  # DataLoader pinned memory and non_blocking host-to-device copies
    allow_tf32: bool  # TF32 matmuls and convolutions (CUDA)
    backend: str  # torch.distributed backend: nccl on CUDA, gloo elsewhere
    short_attention: bool  # the CPU short_attention / math-SDPA path of models/transformer applies
    note: str = ""  # a fallback that was taken (logged once by whoever acts on the plan)

    @property
    def effective_precision(self) -> str:
        """What the forward passes compute in: fp32, bf16 or fp16 (``auto`` resolved)."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.autocast_dtype, "fp32")

    @property
    def non_blocking(self) -> bool:
        return self.pin_memory

    @property
    def device_type(self) -> str:
        return self.device.type

    def autocast(self):
        """The autocast context of the forward passes (a no-op for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def make_scaler(self):
        """A ``torch.amp.GradScaler`` for fp16, else None."""
        return torch.amp.GradScaler(self.device.type) if self.grad_scaler else None

    def move(self, obj: Any) -> Any:
        """``obj`` (a tensor, or dicts / lists / tuples of them, other values kept) on this device; copies from
        pinned host memory are asynchronous on CUDA."""
        if torch.is_tensor(obj):
            if obj.device == self.device:
                return obj
            return obj.to(self.device, non_blocking=self.non_blocking and obj.is_pinned())
        if isinstance(obj, dict):
            return {k: self.move(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.move(v) for v in obj)
        return obj

    def apply(self) -> None:
        """Process-wide settings the plan asks for: the current CUDA device and TF32 matmuls."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True


def parse_device(device: str) -> tuple[str, int | None]:
    """("auto" | "cpu" | "cuda" | "mps", index or None); anything else is a ConfigError naming the accepted forms."""
    m = _DEVICE.match(str(device).strip().lower())
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got '{device}'")
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def device_plan(device: str = "auto", precision: str = "bf16", *, local_rank: int | None = None,
                cuda_available: bool | None = None, cuda_count: int | None = None,
                bf16_supported: bool | None = None, mps_available: bool | None = None,
                cpu_bf16_fast: bool | None = None) -> DevicePlan:
    """The :class:`DevicePlan` for ``device`` and ``precision`` on this machine.

    ``local_rank``: this process's index on its machine under a launcher; ``cuda`` / ``auto`` then take GPU
    ``local_rank`` (one GPU per process). The availability flags default to what torch reports."""
    kind, index = parse_device(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if mps_available is None:
        mps_available = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if kind == "auto":
        kind = "cuda" if cuda_available else "cpu"
    if kind == "cuda":
        if not cuda_available:
            build = f"this PyTorch {torch.__version__} has no CUDA support" if torch.version.cuda is None \
                else "torch.cuda.is_available() is False (no GPU visible: check the driver and CUDA_VISIBLE_DEVICES)"
            raise DeviceUnavailable(f"device={device} asks for a GPU but {build}; train with device=cpu (or "
                                    "device=auto, which takes the GPU when there is one)")
        if cuda_count is None:
            cuda_count = torch.cuda.device_count()
        if index is None:
            index = local_rank or 0
        if index >= cuda_count:
            why = f" (local rank {local_rank}: one GPU per process)" if device == "cuda" or device == "auto" else ""
            raise DeviceUnavailable(f"device={device} needs GPU {index}{why} but this machine shows {cuda_count}; "
                                    f"use cuda:0..cuda:{cuda_count - 1}, or start at most {cuda_count} processes "
                                    "per machine")
        if bf16_supported is None:
            with torch.cuda.device(index):
                bf16_supported = torch.cuda.is_bf16_supported()
    elif kind == "mps" and not mps_available:
        raise DeviceUnavailable(f"device={device} asks for Apple's MPS but it is not available in this PyTorch / on "
                                "this machine; train with device=cpu")
    torch_device = torch.device(kind if index is None else f"{kind}:{index}")

    note, dtype, scaler = "", None, False
    if kind == "cpu" and precision in ("bf16", "auto") and cpu_bf16_fast is None:
        cpu_bf16_fast = cpu_has_fast_bf16()
    if precision == "auto":
        if kind == "cpu":
            precision_now = "bf16" if cpu_bf16_fast else "fp32"
            why = "this CPU has oneDNN's bf16 kernels" if cpu_bf16_fast else \
                "this CPU has no fast bf16 kernels (no AVX-512), where bf16 GEMMs are several times slower than fp32"
        elif kind == "cuda":
            precision_now = "bf16"
            why = "a GPU"
        else:
            precision_now, why = "fp32", f"{kind.upper()} (mixed precision is not chosen automatically there)"
        note = f"precision=auto: {precision_now} ({why})"
        plan = device_plan(device, precision_now, local_rank=local_rank, cuda_available=cuda_available,
                           cuda_count=cuda_count, bf16_supported=bf16_supported, mps_available=mps_available,
                           cpu_bf16_fast=cpu_bf16_fast)
        return dataclasses.replace(plan, precision="auto", note="; ".join(n for n in (note, plan.note) if n))
    if precision == "bf16" and kind == "cpu" and cpu_bf16_fast is False:
        note = ("precision=bf16 on a CPU without fast bf16 kernels (no AVX-512: oneDNN's bf16 GEMMs run several "
                "times slower than fp32 here); set precision=fp32 or precision=auto for speed")
    if precision == "bf16":
        dtype = torch.bfloat16
        if kind in ("cuda", "mps") and bf16_supported is False:
            dtype, scaler = torch.float16, True
            note = (f"this {kind.upper()} device has no bf16: precision=bf16 trains in fp16 autocast with a GradScaler "
                    "(set precision=fp16 to say so, or fp32)")
    elif precision == "fp16":
        if kind == "cpu":
            raise ConfigError("precision=fp16 is for GPUs (fp16 autocast with loss scaling); on CPU train with "
                              "precision=bf16 (autocast, no scaling needed) or fp32")
        dtype, scaler = torch.float16, True
    on_cuda = kind == "cuda"
    return DevicePlan(device=torch_device, precision=precision, autocast_dtype=dtype, grad_scaler=scaler,
                      pin_memory=on_cuda, allow_tf32=on_cuda, backend="nccl" if on_cuda else "gloo",
                      short_attention=kind == "cpu", note=note)


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 GEMMs on this CPU with native instructions (AVX-512 and up); False on AVX2-only
    CPUs, where bf16 autocast is several times slower than fp32 (see the module docstring)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001  (a private op: absent in some builds)
        return False


def resolve_device(device: str = "auto") -> torch.device:
    """The torch.device a command that only encodes (eval, embed, index, adapt) runs on: the same names and the
    same start-up errors as training's ``device`` option."""
    return device_plan(device, "fp32").device
