"""Registry of loss terms: ``register(name)`` decorates a term class (an ``nn.Module`` whose
``forward(LossInputs)`` returns a dict with a ``"loss"`` entry)."""
from __future__ import annotations

from ..registry import Registry

LOSSES: Registry = Registry("loss term")


def register(name: str):
    return LOSSES.register(name)


def available() -> list[str]:
    """Names of all registered loss terms."""
    return LOSSES.names()


def build(name: str, **options):
    """Instantiate the registered term ``name`` with its options."""
    return LOSSES.get(name)(**options)
