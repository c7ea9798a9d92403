"""Checkpoints: model weights in safetensors, the rest of the training state beside them.

A checkpoint is a directory ``step_000123/`` with ``model.safetensors`` (weights only),
``model_config.json`` (the architecture, so the directory loads with ``clipforge.models.load_model``),
``state.pt`` (optimizer, scheduler, RNG, step, data position; loaded with
``weights_only=True``) and ``config.yaml``. Directories are written under a temporary name
and renamed, so an interrupted save never replaces a good checkpoint with a broken one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.io import load_weights, save_model  # noqa: F401  (re-exported)


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, state: dict[str, Any], config_yaml: str, keep: int = 2) -> Path:
    ckpt_root = Path(out_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, tmp, metadata={"step": str(step)})
    torch.save(state, tmp / "state.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (ckpt_root / "latest.json").write_text(json.dumps({"step": step, "path": final.name}))
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.exists() else []


def resolve_checkpoint(out_dir: str | Path, resume: str) -> Path:
    """``resume`` is "latest" (newest in ``out_dir``) or a checkpoint directory."""
    if resume == "latest":
        found = list_checkpoints(out_dir)
        if not found:
            raise FileNotFoundError(f"resume=latest but '{out_dir}/checkpoints' holds no checkpoint; start without resume")
        return found[-1]
    path = Path(resume)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"'{path}' is not a clipforge checkpoint directory (no model.safetensors inside)")
    return path


def load_state(ckpt_dir: str | Path) -> dict[str, Any]:
    return torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)
