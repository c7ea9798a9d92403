"""Teacher embeddings as the distillation terms read them.

Teachers are frozen and their embeddings are precomputed and stored with the data (as
MobileCLIP does, though its "reinforced" datasets hold embeddings of many augmented views and
synthetic captions), so a training step runs no teacher forward pass.
``extra["teacher_image_features"]`` and ``extra["teacher_text_features"]`` come in one of
three layouts, each teacher's embeddings L2-normalized in its own dimension:

- ``[B, d]``: one teacher;
- ``[T, B, d]``: T teachers of the same dimension;
- a list of T tensors ``[B, d_k]``: teachers of different dimensions (an ensemble of
  different architectures).

:func:`teacher_list` turns any of them into a list of ``[B, d_k]`` tensors.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .gather import gather


def teacher_list(features: Tensor | Sequence[Tensor], name: str = "teacher features") -> list[Tensor]:
    """``[B, d]``, ``[T, B, d]`` or a list of ``[B, d_k]`` -> a list of T tensors ``[B, d_k]``."""
    if isinstance(features, Tensor):
        if features.ndim == 2:
            return [features]
        if features.ndim == 3:
            return list(features.unbind(0))
        raise ValueError(f"{name} must be [B, d] or [T, B, d], got shape {tuple(features.shape)}; "
                         "pass teachers of different sizes as a list of [B, d_k] tensors")
    out = list(features)
    if not out or any(not isinstance(t, Tensor) or t.ndim != 2 for t in out):
        raise ValueError(f"{name} given as a list must hold one [B, d_k] tensor per teacher")
    return out


def teacher_pairs(image: Tensor | Sequence[Tensor], text: Tensor | Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Match each teacher's image and text embeddings, checking that counts, batch and dimension agree."""
    images, texts = teacher_list(image, "teacher image features"), teacher_list(text, "teacher text features")
    if len(images) != len(texts):
        raise ValueError(f"got {len(images)} teachers' image features but {len(texts)} teachers' text features")
    for k, (a, b) in enumerate(zip(images, texts)):
        if a.shape != b.shape:
            raise ValueError(f"teacher {k}: image features {tuple(a.shape)} and text features {tuple(b.shape)} "
                             "must have the same shape [B, d_k]")
    return list(zip(images, texts))


def teacher_scales(scale: float | Sequence[float], count: int) -> list[float]:
    """One logit scale (temperature multiplier) per teacher: a number for all, or one each."""
    if isinstance(scale, (int, float)):
        return [float(scale)] * count
    scales = [float(s) for s in scale]
    if len(scales) != count:
        raise ValueError(
            f"teacher_scale lists {len(scales)} values for {count} teachers; give one value or one per teacher"
        )
    return scales


def gather_teachers(pairs: list[tuple[Tensor, Tensor]], rank: int, world_size: int) -> list[tuple[Tensor, Tensor]]:
    """Every teacher's image and text embeddings of the whole (gathered) batch."""
    return [(gather(a, rank, world_size), gather(b, rank, world_size)) for a, b in pairs]


def teacher_keys(teacher: str = "teacher") -> tuple[str, str]:
    """The ``extra`` keys of a teacher's image and text embeddings: ``teacher`` for the stored
    embeddings of frozen teachers, ``ema`` for the training program's EMA copy of the model."""
    if not teacher or not teacher.isidentifier():
        raise ValueError(f"teacher must be a key prefix such as 'teacher' or 'ema', got {teacher!r}")
    return f"{teacher}_image_features", f"{teacher}_text_features"
