"""glibc malloc settings for tensor work: keep freed memory for the next step instead of handing it back.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its *mmap threshold* (128 KiB at start,
raised dynamically up to 32 MiB as mapped blocks are freed) with its own ``mmap`` and unmaps it on ``free``, and
gives the top of its heap back to the kernel whenever more than its *trim threshold* (twice the mmap threshold,
dynamically) is free there. A training step frees nearly all of its activations and gradients and allocates the
same sizes again in the next step, so a large share of them are unmapped and faulted in again, page by page,
every step: about 13,000 minor page faults per bf16 step of ``tiny`` on the 2-core development machine with glibc's
defaults, 4,000 with the settings below (``benchmarks/bench_allocator.py``).

:func:`configure` sets, for this process (``mallopt``) and for the processes it starts (the environment variables
glibc reads at start-up), an mmap threshold of 32 MiB (the largest glibc accepts on 64-bit: smaller blocks come
from the heap and are reused) and a trim threshold of 2 GiB - 1 (the largest ``mallopt`` takes: the heap's top is
kept). Peak memory is unchanged (a step reaches the same peak either way); memory freed after the peak stays with
the process, as PyTorch's CUDA caching allocator keeps freed GPU memory. The measured effect is small: the faults
go down 3-8x on ``tiny`` (1.3-1.4x at width 512, whose largest blocks are above 32 MiB), steps get 1-4% faster
at the median, within the noise of that machine (docs/performance.md, "Memory allocator", with the commands).
Numerics do not change: only where the bytes live.

Every ``clipforge`` command calls :func:`configure` once (``clipforge.cli.main``); a program that uses the library
directly can call it first thing. ``CLIPFORGE_MALLOC=system`` leaves glibc's defaults; settings already given
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``glibc.malloc.*`` in ``GLIBC_TUNABLES``) are left as
they are; on a C library other than glibc (macOS, musl, Windows) nothing is done. Why not jemalloc or tcmalloc:
they must be preloaded before the interpreter starts (``LD_PRELOAD``) and are not installed everywhere; these two
glibc settings remove most of the faults of a small model's step without either.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV_SWITCH = "CLIPFORGE_MALLOC"
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit; mallopt refuses more
TRIM_THRESHOLD = 2**31 - 1  # mallopt's value is a C int
_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
# the variables glibc reads at start-up, with the values configure() sets (for the processes started from here)
GLIBC_ENV = {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD}


@dataclass(frozen=True)
class AllocatorSettings:
    """What :func:`configure` did: ``applied`` and, when it did nothing, ``reason`` (one line saying why)."""

    applied: bool
    reason: str = ""


def _already_set(env: dict[str, str]) -> str | None:
    """The malloc settings the environment gives, other than this module's own (set by an earlier call, or
    inherited from the process that started this one)."""
    given = [k for k, v in GLIBC_ENV.items() if k in env and env[k] != str(v)]
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        given.append("GLIBC_TUNABLES (glibc.malloc.*)")
    return ", ".join(given) or None


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def configure(env: dict[str, str] | None = None) -> AllocatorSettings:
    """Keep freed memory in the process (see the module docstring); safe to call more than once.

    ``env``: the environment to read and to extend for child processes (default ``os.environ``)."""
    env = os.environ if env is None else env
    switch = env.get(ENV_SWITCH, "tuned").strip().lower()
    if switch not in ("tuned", "system"):
        raise ValueError(f"{ENV_SWITCH}={env[ENV_SWITCH]!r} is not a choice: set it to 'tuned' (the default: keep "
                         "freed memory for reuse) or 'system' (glibc's defaults), or unset it")
    if switch == "system":
        return AllocatorSettings(False, f"{ENV_SWITCH}=system: glibc's defaults kept")
    given = _already_set(env)
    if given:
        return AllocatorSettings(False, f"malloc settings given by the environment ({given}): left as they are")
    libc = _libc()
    if libc is None:
        return AllocatorSettings(False, f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'libc'}): "
                                        "nothing to set")
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        return AllocatorSettings(False, "glibc refused the malloc settings (mallopt returned 0): defaults kept")
    for key, value in GLIBC_ENV.items():  # processes started from here (spawned workers, launched ranks)
        env[key] = str(value)
    log.debug("malloc: mmap threshold %d, trim threshold %d (CLIPFORGE_MALLOC=system to keep glibc's defaults)",
              MMAP_THRESHOLD, TRIM_THRESHOLD)
    return AllocatorSettings(True)
