"""Model construction: a config from a name, a JSON file or a dict, and a model from a config.

Every variant is chosen here from its config alone, so loading (:mod:`clipforge.models.io`),
the registry of named architectures and :func:`create_model` agree on which class a config
builds: a config with a ``multimodal`` section is a :class:`~clipforge.models.coca.CoCaConfig`
and builds :class:`~clipforge.models.coca.CoCa`, one with an ``mci`` section is MobileCLIP
(:mod:`~clipforge.models.mobileclip`), one with a ``moe`` section CLIP-MoE (:mod:`~clipforge.models.moe`),
one with an ``lm`` section LLM2CLIP (a frozen causal LM as the text tower, :mod:`~clipforge.models.llm_text`),
one with an ``lvlm`` section the LLaVA-style LVLM (image tower + projector + causal LM, :mod:`~clipforge.models.lvlm`);
one with a ``cosmo`` section COSMO (a causal LM split into a text half and a multimodal half,
:mod:`~clipforge.models.cosmo`);
anything else builds :class:`~clipforge.models.clip.CLIP` (Long-CLIP's stretched positions are a field of the
text config, not a class).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .clip import CLIP
from .coca import CoCa, CoCaConfig
from .config import CLIPConfig
from .cosmo import Cosmo, CosmoConfig
from .llm_text import LLM2CLIP, LLM2CLIPConfig
from .lvlm import LVLM, LVLMConfig
from .mobileclip import MobileCLIP, MobileCLIPConfig
from .moe import MoECLIP, MoECLIPConfig
from .registry import MODEL_CONFIGS

# The section of a config dict that marks a variant, its config class and its model class.
VARIANTS: tuple[tuple[str, type[CLIPConfig], type[CLIP]], ...] = (
    ("multimodal", CoCaConfig, CoCa),
    ("mci", MobileCLIPConfig, MobileCLIP),
    ("moe", MoECLIPConfig, MoECLIP),
    ("lm", LLM2CLIPConfig, LLM2CLIP),
    ("lvlm", LVLMConfig, LVLM),
    ("cosmo", CosmoConfig, Cosmo),
)


def config_from_dict(d: dict[str, Any]) -> CLIPConfig:
    """The config class of the variant whose section the dict has (see ``VARIANTS``), else a CLIPConfig."""
    for section, config_cls, _ in VARIANTS:
        if section in d:
            return config_cls.from_dict(d)
    return CLIPConfig.from_dict(d)


def model_from_config(cfg: CLIPConfig) -> CLIP:
    """A randomly initialized model of the class ``cfg`` describes."""
    for _, config_cls, model_cls in VARIANTS:
        if isinstance(cfg, config_cls):
            return model_cls(cfg)
    return CLIP(cfg)


def get_model_config(name_or_path: str) -> CLIPConfig:
    """Config of a registered name, or of a JSON file path."""
    if name_or_path not in MODEL_CONFIGS and Path(name_or_path).suffix == ".json" and Path(name_or_path).exists():
        return config_from_dict(json.loads(Path(name_or_path).read_text()))
    return config_from_dict(MODEL_CONFIGS.get(name_or_path))


def create_model(name: str | CLIPConfig, seed: int | None = None, **overrides: Any) -> CLIP:
    """Build a randomly initialized model from a registered name, a JSON path or a config.

    ``overrides`` replace top-level fields, e.g. ``create_model("tiny", init_logit_bias=-10.0)``
    for a SigLIP-style bias; a nested dict (``vision={...}``, ``text={...}``, ``lm={...}``) updates that section.
    """
    cfg = name if isinstance(name, CLIPConfig) else get_model_config(name)
    if overrides:
        d = cfg.to_dict()
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(d.get(key), dict):  # a section: update its fields
                d[key].update(value)
            else:
                d[key] = value
        cfg = type(cfg).from_dict(d)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return model_from_config(cfg)
    return model_from_config(cfg)
