"""Input checks shared by the loss terms: typed options and feature shapes, each failing with
an error that names the problem and the fix."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from torch import Tensor

C = TypeVar("C")


def parse_options(config_cls: type[C], options: dict[str, Any], term: str) -> C:
    """``config_cls(**options)``, naming the term and its valid options when a name is wrong."""
    valid = [f.name for f in fields(config_cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"loss term '{term}' has no option(s) {unknown}; its options are {valid}")
    return config_cls(**options)


def check_pairs(a: Tensor, b: Tensor, term: str, names: tuple[str, str] = ("image_features", "text_features"),
                min_batch: int = 1) -> None:
    """``a`` and ``b`` must be paired feature matrices [B, d] of one shape with B >= ``min_batch``."""
    if a.ndim != 2 or b.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{term} needs paired {names[0]} and {names[1]} of one shape [B, d], got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < min_batch:
        raise ValueError(f"{term} needs a batch of at least {min_batch} pairs, got {a.shape[0]}")
