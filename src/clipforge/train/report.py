"""Where a run's numbers go besides ``metrics.jsonl``: ``report_to=[tensorboard]`` and/or ``[wandb]``.

Rank 0 alone reports. Every record the loop writes to metrics.jsonl (loss terms, lr, logit scale, samples/s,
grad norm, evaluation results) goes to each reporter too, as scalars named ``train/<key>`` and
``eval/<key>`` (nested evaluation results joined with ``/``), at the record's step.

- ``tensorboard``: event files in the run directory, beside metrics.jsonl (``tensorboard --logdir runs``);
  a resumed run purges the events past its checkpoint's step, as metrics.jsonl moves those records aside.
  Needs the ``tensorboard`` package (``pip install 'clipforge[tensorboard]'``).
- ``wandb``: Weights & Biases in offline mode (no server, no account; ``wandb sync`` uploads the run
  directory's ``wandb/`` folder later). Needs the ``wandb`` package, which clipforge does not install.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError

logger = logging.getLogger(__name__)

REPORTERS = ("tensorboard", "wandb")


def check_reporters(names: list[str]) -> None:
    """Unknown names and missing packages, named with the fix (called at start-up, before any data is read)."""
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ConfigError(f"report_to: unknown {unknown}; choose from {list(REPORTERS)} (e.g. report_to=[tensorboard])")
    if "tensorboard" in names:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError("report_to=[tensorboard] needs the tensorboard package: pip install tensorboard "
                              "(or clipforge[tensorboard]), or drop it from report_to") from None
    if "wandb" in names:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("report_to=[wandb] needs the wandb package: pip install wandb, or drop it from "
                              "report_to") from None


def scalars(record: dict, prefix: str = "train") -> dict[str, float]:
    """The finite numbers of a metrics record as {tag: value}; ``step`` is the x axis, not a scalar; a nested
    ``eval`` result goes under ``eval/``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update(scalars(value, "eval" if key == "eval" and prefix == "train" else f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


class Reporters:
    """The configured reporters of rank 0 (a no-op object elsewhere or with ``report_to=[]``)."""

    def __init__(self, names: list[str], out_dir: Path, config: dict[str, Any], start_step: int = 0,
                 enabled: bool = True):
        self.tb = self.wandb_run = None
        if not enabled:
            return
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # events past the resumed step are dropped (they are trained again), as metrics.jsonl sets them aside
            self.tb = SummaryWriter(log_dir=str(out_dir), purge_step=start_step + 1 if start_step else None)
        if "wandb" in names:
            import wandb

            self.wandb_run = wandb.init(mode="offline", dir=str(out_dir), config=config, project="clipforge",
                                        name=out_dir.name, resume="allow")

    def log(self, record: dict) -> None:
        values = scalars(record)
        if not values:
            return
        step = int(record.get("step", 0))
        if self.tb is not None:
            for tag, value in values.items():
                self.tb.add_scalar(tag, value, step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
