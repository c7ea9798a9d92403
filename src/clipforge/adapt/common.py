"""Pieces every adapter shares: a labelled feature set and seeding (top-1 accuracy: :func:`clipforge.metrics.top1`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FeatureSet:
    """Normalized image features [N, d], their zero-shot logits [N, C] and labels [N]."""

    features: Tensor
    zero_shot_logits: Tensor
    labels: Tensor

    def __post_init__(self):
        n = self.features.shape[0]
        if self.zero_shot_logits.shape[0] != n or self.labels.shape[0] != n:
            raise ValueError(f"features ({n}), zero-shot logits ({self.zero_shot_logits.shape[0]}) and labels "
                             f"({self.labels.shape[0]}) must have one row per image")

    def __len__(self) -> int:
        return self.features.shape[0]


def set_seed(seed: int) -> torch.Generator:
    """A generator for data order plus the global seed (parameter initialization)."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
