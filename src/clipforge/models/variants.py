"""The dispatch entries of the MobileCLIP and CLIP-MoE variants, for the functions that turn a config dict
into a config and a config into a model (``config_from_dict`` / ``model_from_config``): a dict with an
``mci`` section is a :class:`~clipforge.models.mobileclip.MobileCLIPConfig`, one with a ``moe`` section a
:class:`~clipforge.models.moe.MoECLIPConfig`. Each function returns None for any other config, so the
caller falls back to its own classes."""
from __future__ import annotations

from typing import Any


def variant_config(d: dict[str, Any]):
    if "mci" in d:
        from .mobileclip import MobileCLIPConfig

        return MobileCLIPConfig.from_dict(d)
    if "moe" in d:
        from .moe import MoECLIPConfig

        return MoECLIPConfig.from_dict(d)
    return None


def variant_model(cfg):
    from .mobileclip import MobileCLIP, MobileCLIPConfig
    from .moe import MoECLIP, MoECLIPConfig

    if isinstance(cfg, MobileCLIPConfig):
        return MobileCLIP(cfg)
    if isinstance(cfg, MoECLIPConfig):
        return MoECLIP(cfg)
    return None
