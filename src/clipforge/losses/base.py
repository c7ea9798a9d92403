"""The one structure every loss term reads from, and the composite that sums weighted terms.

A training step builds one :class:`LossInputs` from the batch and the model outputs. Each
term picks the fields it needs (raising a clear error when one is missing) and returns a
dict of named scalars; the key ``"loss"`` is the value that is optimized, any other keys
are logged. :class:`CompositeLoss` sums ``weight * term["loss"]`` over the configured terms,
so a config such as ``{"clip": 1.0, "uniformity": 0.1}`` is all a user writes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import Tensor, nn


@dataclass
class LossInputs:
    """Features and side information for one (local) batch.

    Features are L2-normalized unless a field says otherwise; ``logit_scale`` is the
    multiplier itself (already exponentiated). ``extra`` carries anything method-specific
    under documented keys, for example ``"negative_text_features"`` ([B, K, d]),
    ``"teacher_image_features"``, ``"labels"``, ``"counts"``.
    """

    image_features: Tensor
    text_features: Tensor
    logit_scale: Tensor
    logit_bias: Tensor | None = None
    image_tokens: Tensor | None = None  # [B, N, d] patch-level features (projected)
    text_tokens: Tensor | None = None  # [B, L, d] token-level features (projected)
    text_mask: Tensor | None = None  # [B, L] bool, True for real tokens
    extra: dict[str, Any] = field(default_factory=dict)
    # distributed context: features of the whole global batch are gathered by the
    # term itself through clipforge.losses.gather, using these two values.
    rank: int = 0
    world_size: int = 1

    def require(self, key: str) -> Any:
        """Return ``extra[key]`` or a field by name, with an error that names the missing input."""
        value = getattr(self, key, None) if key in self.__dataclass_fields__ else self.extra.get(key)
        if value is None:
            raise KeyError(
                f"this loss term needs '{key}' in its inputs, but the batch/model outputs do not provide it; "
                f"add it to the dataset or model outputs (LossInputs.extra['{key}'])"
            )
        return value


class CompositeLoss(nn.Module):
    """Weighted sum of named loss terms; returns the total as ``"loss"`` and every part for logging."""

    def __init__(self, terms: Mapping[str, nn.Module], weights: Mapping[str, float]):
        super().__init__()
        if set(terms) != set(weights):
            raise ValueError(f"terms {sorted(terms)} and weights {sorted(weights)} must name the same entries")
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = dict(weights)

    def extra_keys(self) -> set[str]:
        """The ``LossInputs.extra`` entries the terms need (each term lists its own in ``extra_keys``),
        so the training program prepares only what the configured loss reads."""
        return {key for term in self.terms.values() for key in getattr(term, "extra_keys", ())}

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        total: Tensor | None = None
        logs: dict[str, Tensor] = {}
        for name, term in self.terms.items():
            out = term(inputs)
            if "loss" not in out:
                raise KeyError(f"loss term '{name}' returned no 'loss' entry")
            for key, value in out.items():
                logs[f"{name}" if key == "loss" else f"{name}/{key}"] = value.detach()
            contribution = self.weights[name] * out["loss"]
            total = contribution if total is None else total + contribution
        assert total is not None, "CompositeLoss needs at least one term"
        logs["loss"] = total
        return logs
