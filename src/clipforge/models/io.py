"""Saving and loading clipforge model weights (safetensors) with their architecture config.

A saved model is a directory with ``model.safetensors`` and ``model_config.json`` (a
:class:`CLIPConfig`). Training checkpoints use the same two files, so any checkpoint
directory is also a loadable model.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from .clip import CLIP
from .factory import config_from_dict, model_from_config


def save_model(model: CLIP, directory: str | Path, metadata: dict[str, str] | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt", **(metadata or {})})
    (directory / "model_config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2))
    return directory


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load ``model.safetensors`` (a file or a directory holding it), naming any key or shape mismatch."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no weights at '{file}'")
    weights = load_file(str(file))
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if strict and (missing or unexpected):
        raise KeyError(
            f"checkpoint '{file}' does not match the model: missing keys {missing[:10]}{'...' if len(missing) > 10 else ''}, "
            f"unexpected keys {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}. Build the model with the config the "
            "checkpoint was saved with (model_config.json beside it)."
        )
    for k, v in weights.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"shape mismatch for '{k}': checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
    model.load_state_dict(weights, strict=strict)


def load_model(directory: str | Path) -> CLIP:
    """Build the architecture from ``model_config.json`` and load ``model.safetensors``."""
    directory = Path(directory)
    if (directory / "checkpoints" / "latest.json").exists():  # a run directory: take its newest checkpoint
        latest = json.loads((directory / "checkpoints" / "latest.json").read_text())["path"]
        directory = directory / "checkpoints" / latest
    cfg_file = directory / "model_config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(
            f"'{directory}' is not a clipforge model directory: it needs model_config.json and model.safetensors "
            "(written by clipforge train or clipforge.models.save_model)"
        )
    model = model_from_config(config_from_dict(json.loads(cfg_file.read_text())))
    load_weights(model, directory)
    return model.eval()
