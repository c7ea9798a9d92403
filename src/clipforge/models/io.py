"""Saving and loading clipforge model weights (safetensors) with their architecture config.

A saved model is a directory with ``model.safetensors`` and ``model_config.json`` (a
:class:`CLIPConfig`). Training checkpoints use the same two files, so any checkpoint
directory is also a loadable model.

Loading checks what it reads: a truncated or corrupt safetensors file is reported with its
path (:func:`read_safetensors`), and a model whose parameters hold NaN or inf is refused
(:func:`check_finite`) unless ``allow_nonfinite=True``, since it would embed everything to NaN.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .clip import CLIP
from .factory import config_from_dict, model_from_config

logger = logging.getLogger(__name__)


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file; a damaged file gives an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at '{path}'")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError (header, sizes) or OSError
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"'{path}' is not a readable safetensors file ({first}): it is truncated or corrupt, e.g. "
                         "an interrupted download or copy; fetch or copy it again") from None


def check_finite(model: nn.Module, source: str, allow_nonfinite: bool = False) -> None:
    """Refuse (or, with ``allow_nonfinite``, loudly warn about) parameters that hold NaN or inf."""
    bad = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() or p.is_complex():
                n = p.numel() - int(torch.isfinite(p).sum())
                if n:
                    bad.append(f"{name} ({n} of {p.numel()})")
    if not bad:
        return
    where = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more tensors" if len(bad) > 6 else "")
    if not allow_nonfinite:
        raise ValueError(f"'{source}' has non-finite weights (NaN or inf) in {len(bad)} tensor(s): {where}. The model "
                         "would embed everything to NaN; load an earlier checkpoint, or pass allow_nonfinite=True "
                         "(CLI --allow-nonfinite) to load it anyway")
    logger.warning("LOADING A MODEL WITH NON-FINITE WEIGHTS (allow_nonfinite=True): '%s' has NaN or inf in %d "
                   "tensor(s): %s. Its outputs will be NaN wherever these weights are used.", source, len(bad), where)


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
    weights = read_safetensors(file)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if strict and (missing or unexpected):
        raise KeyError(
            f"checkpoint '{file}' does not match the model: missing keys "
            f"{missing[:10]}{'...' if len(missing) > 10 else ''}, "
            f"unexpected keys {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}. Build the model with the "
            "config the "
            "checkpoint was saved with (model_config.json beside it)."
        )
    for k, v in weights.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"shape mismatch for '{k}': checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
    model.load_state_dict(weights, strict=strict)


SHARDED_INDEX = ".metadata"  # torch.distributed.checkpoint's index: a checkpoint of distributed.strategy=fsdp


def load_sharded_weights(model: nn.Module, directory: str | Path) -> None:
    """Load the model weights of a sharded training checkpoint (``torch.distributed.checkpoint`` files written by
    ``distributed.strategy=fsdp``, any number of ranks) into ``model``, in one process: the shards are assembled
    into full tensors. A missing tensor or a shape mismatch is named."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    except Exception as e:  # noqa: BLE001  (a damaged or foreign .metadata)
        raise ValueError(f"'{directory}' holds an unreadable sharded checkpoint ({type(e).__name__}: {e}); "
                         "resume or load another checkpoint") from None
    saved = {k[len("model."):]: v for k, v in metadata.state_dict_metadata.items() if k.startswith("model.")}
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise KeyError(f"sharded checkpoint '{directory}' does not match the model: missing keys {missing[:10]}, "
                       f"unexpected keys {unexpected[:10]}. Build the model with the config the checkpoint was saved "
                       "with (model_config.json beside it).")
    for k, meta in saved.items():
        if tuple(getattr(meta, "size", own[k].shape)) != tuple(own[k].shape):
            raise ValueError(f"shape mismatch for '{k}': checkpoint {tuple(meta.size)} vs model {tuple(own[k].shape)}")
    dcp.load({"model": own}, checkpoint_id=directory, no_dist=True)
    model.load_state_dict(own)


def load_model(directory: str | Path, allow_nonfinite: bool = False) -> CLIP:
    """Build the architecture from ``model_config.json`` and load ``model.safetensors``.

    Non-finite weights are refused unless ``allow_nonfinite`` (then a warning is logged).
    """
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
    if (directory / SHARDED_INDEX).is_file() and not (directory / "model.safetensors").exists():
        load_sharded_weights(model, directory)
    else:
        load_weights(model, directory)
    check_finite(model, str(directory), allow_nonfinite)
    return model.eval()
