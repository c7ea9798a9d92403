"""Pieces every adapter shares: a labelled feature set and top-1 accuracy."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..evaluation.zero_shot import classification_metrics


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


def top1(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy, tied logits ordered at random in expectation (as the evaluation suite counts)."""
    return classification_metrics(logits.detach().float(), labels, logits.shape[1], topk=(1,))["top1"]


def set_seed(seed: int) -> torch.Generator:
    """A generator for data order plus the global seed (parameter initialization)."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
