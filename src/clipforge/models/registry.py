"""Named model configurations: JSON files in ``model_configs/`` plus any registered at run time, as dicts
(:func:`clipforge.models.factory.get_model_config` turns a name into a config)."""
from __future__ import annotations

import json
from importlib import resources

from ..registry import Registry
from .config import CLIPConfig

MODEL_CONFIGS: Registry[dict] = Registry("model")


def _load_builtin() -> None:
    for entry in sorted(resources.files("clipforge.models").joinpath("model_configs").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            MODEL_CONFIGS.register(entry.name[: -len(".json")], json.loads(entry.read_text()))


_load_builtin()


def register_model(name: str, config: CLIPConfig | dict, overwrite: bool = False) -> None:
    """Add a named architecture (a CLIPConfig or its dict form)."""
    MODEL_CONFIGS.register(
        name, config.to_dict() if isinstance(config, CLIPConfig) else dict(config), overwrite=overwrite
    )


def list_models() -> list[str]:
    return MODEL_CONFIGS.names()
