"""clipforge.losses: the training objectives of CLIP and its successors, as composable terms.

``available()`` lists the registered names, ``build(name, **options)`` makes one,
``build_composite({"clip": 1.0, ...})`` makes a weighted sum. Functional forms work on
L2-normalized features with ``logit_scale`` already exponentiated.
"""
from __future__ import annotations

from typing import Any, Mapping

from .base import CompositeLoss, LossInputs
from .registry import LOSSES, available, build, register

# importing a module registers its terms
from .clip import ClipLoss, clip_loss
from .siglip import SigLipLoss, siglip_loss

# --- group A terms (one module per method) ---
# --- end group A ---

# --- group B terms (one module per method) ---
# --- end group B ---


def build_composite(spec: Mapping[str, Any]) -> CompositeLoss:
    """Build a weighted sum from ``{name: weight}`` or ``{name: {"weight": w, **options}}``."""
    terms, weights = {}, {}
    for name, value in spec.items():
        if isinstance(value, Mapping):
            opts = dict(value)
            weights[name] = float(opts.pop("weight", 1.0))
            kind = opts.pop("term", name)
        else:
            weights[name], opts, kind = float(value), {}, name
        terms[name] = build(kind, **opts)
    return CompositeLoss(terms, weights)


__all__ = [
    "LossInputs", "CompositeLoss", "LOSSES", "available", "build", "build_composite", "register",
    "clip_loss", "siglip_loss", "ClipLoss", "SigLipLoss",
]
