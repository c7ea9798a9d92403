"""clipforge.models: the dual encoder and its registry of named architectures."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .clip import CLIP
from .coca import CoCa, CoCaConfig, MultimodalConfig, model_from_config
from .config import CLIPConfig, TextConfig, VisionConfig
from .io import load_model, load_weights, save_model
from .registry import MODEL_CONFIGS, get_model_config, list_models, register_model


def create_model(name: str | CLIPConfig, seed: int | None = None, **overrides: Any) -> CLIP:
    """Build a randomly initialized model from a registered name, a JSON path or a config.

    ``overrides`` replace top-level fields, e.g. ``create_model("tiny", init_logit_bias=-10.0)``
    for a SigLIP-style bias; nested ``vision={...}`` / ``text={...}`` dicts update the towers.
    """
    cfg = name if isinstance(name, CLIPConfig) else get_model_config(name)
    if overrides:
        d = cfg.to_dict()
        for key, value in overrides.items():
            if key in ("vision", "text", "multimodal") and isinstance(value, dict):
                d[key].update(value)
            else:
                d[key] = value
        cfg = type(cfg).from_dict(d)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return model_from_config(cfg)
    return model_from_config(cfg)


__all__ = ["CLIP", "CLIPConfig", "TextConfig", "VisionConfig", "create_model", "get_model_config", "list_models",
           "register_model", "MODEL_CONFIGS", "load_model", "load_weights", "save_model",
           "CoCa", "CoCaConfig", "MultimodalConfig"]
