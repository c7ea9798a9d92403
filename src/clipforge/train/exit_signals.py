"""What the launcher (:func:`clipforge.train.distributed.launch`) says about a process that ended without a word.

A process started by ``distributed.nproc=N`` reports its result or its Python exception through a pipe; one that
dies of a signal reports nothing, and its exit code (minus the signal number) is all the launcher has. The message
names the signal and what usually sends it.

Why a module of its own, imported inside ``launch``: the fidelity runner (benchmarks/fidelity.py) records, for every
run, a hash of each unit of library code the run executed, and a module's top level (its imports and the signature
of each function defined there) is one such unit. Every training run executes ``train/distributed.py``'s top level,
so a new import or function there would mark every recorded training run as run on changed code, though nothing
it computes changed. Code that only multi-process launches execute lives here instead.
"""
from __future__ import annotations

import signal

CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGFPE, signal.SIGABRT, signal.SIGBUS, signal.SIGILL}  # faulthandler's
OUTSIDE_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def silent_exit_message(rank: int, nproc: int, code: int | None) -> str:
    """The launcher's message for process ``rank`` of ``nproc`` that ended with exit code ``code`` without reporting
    (a negative code is the signal that killed it)."""
    if code is None or code >= 0:
        return f"process {rank} of {nproc} exited with code {code} without reporting"
    try:
        sig = signal.Signals(-code)
    except ValueError:
        return f"process {rank} of {nproc} was killed by signal {-code} without reporting"
    head = f"process {rank} of {nproc} was killed by {sig.name} without reporting"
    if sig in CRASH_SIGNALS:  # faulthandler (on in every started process) printed the Python stacks
        return (f"{head} (a crash in native code: PyTorch, a BLAS or gloo); where Python was when it crashed is on "
                "the run's stderr above (\"Fatal Python error\"), the place to start a bug report")
    if sig == signal.SIGKILL:
        return f"{head} (the system's out-of-memory killer, or a kill -9 from outside)"
    if sig in OUTSIDE_SIGNALS:
        return f"{head} (stopped from outside)"
    return head
