"""Corpora built into webdataset shards: ``openclipart`` and ``emoji`` from installed packages,
and the procedural ``shapes``.

``BUILDERS`` maps a corpus name to the module whose ``build(out, image_size, limit, workers, ...)``
writes it; modules are imported only when used (their rendering libraries are heavy).
"""
from __future__ import annotations

import importlib
from typing import Callable

BUILDERS = {
    "openclipart": "clipforge.data.corpora.openclipart",
    "emoji": "clipforge.data.corpora.emoji",
    "shapes": "clipforge.data.corpora.shapes",
}


def get_builder(name: str) -> Callable[..., dict]:
    """The ``build`` function of corpus ``name``."""
    if name not in BUILDERS:
        raise KeyError(f"unknown corpus '{name}'; available: {', '.join(sorted(BUILDERS))}")
    return importlib.import_module(BUILDERS[name]).build
