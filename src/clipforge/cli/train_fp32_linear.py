"""``clipforge train --fp32-linear``: whether a run trains with oneDNN's fp32 linear layers
(:mod:`clipforge.models.onednn_linear`)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def use_onednn_linears(cfg, choice: str = "auto") -> bool:
    """Whether this process trains with :func:`clipforge.models.onednn_linear.onednn_fp32_linears`: fp32 on the
    CPU, not compiled, and not a run whose processes are started here (they would not inherit the switch); then
    ``choice`` decides ('auto': where :func:`~clipforge.models.onednn_linear.onednn_is_faster` says so)."""
    from ..models.onednn_linear import onednn_is_faster
    from ..train.device import device_plan
    from ..train.distributed import launched

    if choice == "torch":
        return False
    plan = device_plan(cfg.device, cfg.precision)
    compiled = bool(cfg.model_overrides.get("compile"))  # model_overrides.compile=true: torch.compile's own kernels
    if (plan.device.type != "cpu" or plan.effective_precision != "fp32" or compiled
            or (cfg.distributed.nproc > 1 and not launched())):
        return False
    use = choice == "onednn" or onednn_is_faster()
    if use:
        log.info("fp32 linear layers run as oneDNN kernels (--fp32-linear %s)", choice)
    return use
