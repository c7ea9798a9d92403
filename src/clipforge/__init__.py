"""clipforge: Contrastive Language-Image Pre-training and the research that improved it.

The library core is ``clipforge.models``, ``clipforge.losses``, ``clipforge.data``,
``clipforge.tokenizer`` and ``clipforge.transforms``. The training program
(``clipforge.train``), evaluation (``clipforge.evaluation``) and the command line
(``clipforge.cli``) depend on the core, never the reverse.

Top-level names are imported lazily so that ``import clipforge`` and the CLI start fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "create_model": "clipforge.models",
    "list_models": "clipforge.models",
    "get_model_config": "clipforge.models",
    "CLIP": "clipforge.models",
    "CLIPConfig": "clipforge.models",
    "load_model": "clipforge.models",
    "save_model": "clipforge.models",
    "tokenize": "clipforge.tokenizer",
    "get_tokenizer": "clipforge.tokenizer",
    "image_transform": "clipforge.transforms",
    "load_image": "clipforge.images",
    "load": "clipforge.interop",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clipforge' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY) + ["__version__"]
