"""clipforge.models: the dual encoder and its registry of named architectures."""
from __future__ import annotations

from .clip import CLIP
from .coca import CoCa, CoCaConfig, MultimodalConfig
from .config import CLIPConfig, TextConfig, VisionConfig
from .factory import config_from_dict, create_model, get_model_config, model_from_config
from .io import load_model, load_weights, save_model
from .registry import MODEL_CONFIGS, list_models, register_model

__all__ = ["CLIP", "CLIPConfig", "TextConfig", "VisionConfig", "create_model", "get_model_config", "list_models",
           "register_model", "MODEL_CONFIGS", "load_model", "load_weights", "save_model",
           "CoCa", "CoCaConfig", "MultimodalConfig", "config_from_dict", "model_from_config"]
