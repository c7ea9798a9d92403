"""Corpora built into webdataset shards: ``openclipart`` and ``emoji`` from installed packages,
and the procedural ``shapes``.

``BUILDERS`` maps a corpus name to its :class:`Corpus`: the module whose
``build(out, image_size, limit, workers, ...)`` writes it (imported only when used: the
rendering libraries are heavy) and the dataset name under which the built shards register in
:data:`clipforge.data.DATASETS` (:mod:`clipforge.data.shards` registers them from this table).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Corpus:
    """``module``: where ``build`` lives. ``dataset``: the registered dataset name of the built
    corpus, or None when it has none (the built ``shapes`` shards: the name ``shapes`` is the
    procedural generator itself; read the shards with ``build_dataset("shards", root=...)``)."""

    module: str
    dataset: str | None


BUILDERS = {
    "openclipart": Corpus("clipforge.data.corpora.openclipart", dataset="openclipart"),
    "emoji": Corpus("clipforge.data.corpora.emoji", dataset="emoji"),
    "shapes": Corpus("clipforge.data.corpora.shapes_shards", dataset=None),
}


def get_builder(name: str) -> Callable[..., dict]:
    """The ``build`` function of corpus ``name``."""
    if name not in BUILDERS:
        raise KeyError(f"unknown corpus '{name}'; available: {', '.join(sorted(BUILDERS))}")
    return importlib.import_module(BUILDERS[name].module).build
