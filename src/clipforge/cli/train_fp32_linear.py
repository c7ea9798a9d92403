"""``clipforge train --fp32-linear``: whether a run trains with oneDNN's fp32 linear layers
(:mod:`clipforge.models.onednn_linear`)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def use_onednn_linears(cfg, choice: str = "auto") -> bool:
    """Whether this run trains with :func:`clipforge.models.onednn_linear.onednn_fp32_linears`: not compiled;
    then the device, the precision and ``choice`` decide as for the other commands
    (:func:`clipforge.cli.fp32_linear_option.use_onednn`: fp32 on the CPU, 'auto' where
    :func:`~clipforge.models.onednn_linear.onednn_is_faster` says so). The processes that ``distributed.nproc``
    starts take the same choice (:func:`clipforge.train.distributed.launch`)."""
    from ..train.device import device_plan
    from .fp32_linear_option import use_onednn

    compiled = bool(cfg.model_overrides.get("compile"))  # model_overrides.compile=true: torch.compile's own kernels
    if choice == "torch" or compiled:
        return False
    plan = device_plan(cfg.device, cfg.precision)
    use = use_onednn(choice, str(plan.device), plan.effective_precision)
    if use:  # info here (use_onednn logs at debug): a training run's output says how it trains
        log.info("fp32 linear layers run as oneDNN kernels (--fp32-linear %s)", choice)
    return use
