"""``--fp32-linear`` for the commands that run a model they did not train from a config: ``clipforge eval``,
``clipforge index`` and ``clipforge adapt``. Their fp32 forward passes (and adapt's backward passes through the
frozen towers) call ``F.linear``; inside :func:`fp32_linears` those calls take oneDNN's fp32 kernels
(:mod:`clipforge.models.onednn_linear`) on CPUs where they are the faster ones (a Zen 5 EPYC: about twice torch's
fp32 GEMM rate). ``clipforge train`` has the same option (``cli/train_fp32_linear.py``); ``clipforge embed``
needs none, its ``to_inference`` layers are oneDNN kernels already.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)

CHOICES = ("auto", "onednn", "torch")


def add_fp32_linear_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--fp32-linear auto|onednn|torch`` on ``parser``; ``what``: what the command computes in fp32."""
    parser.add_argument("--fp32-linear", choices=CHOICES, default="auto",
                        help=f"{what} in fp32 on the CPU: 'onednn' runs the linear layers as oneDNN kernels (the "
                             "same fp32 arithmetic, sums in another order: results agree to float rounding; about "
                             "2x torch's own GEMM rate on a Zen 5 EPYC, docs/performance.md), 'torch' keeps "
                             "torch's, 'auto' (default) times both once (~0.1 s) and takes oneDNN where it is at "
                             "least 1.3x faster on this CPU. Nothing changes for bf16 or on a GPU")


def use_onednn(choice: str, device: str = "cpu", precision: str = "fp32") -> bool:
    """Whether ``--fp32-linear choice`` routes this command's linear layers through oneDNN: never for a GPU or
    bf16 (autocast runs bf16 kernels, which are oneDNN's already), always for 'onednn', where it is measured
    faster for 'auto' (:func:`clipforge.models.onednn_linear.onednn_is_faster`)."""
    import torch

    from ..models.onednn_linear import onednn_is_faster

    if choice not in CHOICES:
        raise ValueError(f"--fp32-linear must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "torch" or torch.device(device).type != "cpu" or precision != "fp32":
        return False
    use = choice == "onednn" or onednn_is_faster()
    if use:  # debug, not info: these commands' stdout is their results (a --quiet index prints nothing else)
        log.debug("fp32 linear layers run as oneDNN kernels (--fp32-linear %s)", choice)
    return use


@contextlib.contextmanager
def fp32_linears(choice: str, device: str = "cpu", precision: str = "fp32") -> Iterator[bool]:
    """Inside: ``F.linear`` in fp32 on the CPU takes oneDNN's kernels where :func:`use_onednn` says so; yields
    whether it does."""
    from ..models.onednn_linear import onednn_fp32_linears

    use = use_onednn(choice, device, precision)
    with onednn_fp32_linears(use):
        yield use
