"""CLIP's symmetric InfoNCE loss.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision"
(2021). With normalized image features x_i, text features y_j and the temperature multiplier
t (already exponentiated), the logits are s_ij = t x_i·y_j. Each image must pick its own
caption among the batch's captions and each caption its own image; the loss is the mean of
the two cross-entropies:

    L = 1/2 [ -1/B sum_i log softmax_j(s_ij)[i]  -  1/B sum_j log softmax_i(s_ij)[j] ]

Label smoothing eps replaces each one-hot target by (1 - eps) one-hot + eps / B (the same
convention as ``torch.nn.functional.cross_entropy``).

``image_view2=True`` adds the same loss for a second augmented view of every image against the
captions (``extra["image_features_view2"]``) and averages the two, the image side of the improved
recipe of "Improved baselines for vision-language pre-training" (Fini et al. 2023): its CLIP loss is
(L_global + n L_augmented) / (1 + n) over n augmented views; here n = 1, the views share the model's
projection and logit scale (the paper gives them a separate MLP projector and temperature).

``chunk_size`` switches to the exact memory-efficient form of :mod:`.chunked`: the same value
and gradients with O(B·d + chunk·B) extra memory, never holding the B x B logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .chunked import chunked_clip_loss, chunked_row_cross_entropy
from .gather import gather, local_offset
from .registry import register
from .validate import check_pairs, parse_options


@dataclass
class ClipConfig:
    label_smoothing: float = 0.0  # eps in [0, 1)
    chunk_size: int | None = None  # rows per block of the exact chunked form; None: dense logits
    image_view2: bool = False  # also contrast a second augmented image view with the captions, then average

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"clip label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"clip chunk_size must be a positive number of rows (or null for dense), "
                             f"got {self.chunk_size}")
        self.image_view2 = bool(self.image_view2)


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Symmetric InfoNCE on L2-normalized [B, d] features; ``logit_scale`` is already exponentiated."""
    check_pairs(image_features, text_features, "clip_loss")
    if chunk_size:
        return chunked_clip_loss(image_features, text_features, logit_scale, label_smoothing, chunk_size)
    logits = logit_scale * image_features @ text_features.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss_i = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    loss_t = F.cross_entropy(logits.t(), labels, label_smoothing=label_smoothing)
    return 0.5 * (loss_i + loss_t)


@register("clip")
class ClipLoss(nn.Module):
    """Registered term for :func:`clip_loss` (options: the fields of :class:`ClipConfig`).

    Across processes each one scores its local images against all gathered texts and its
    local texts against all gathered images, targets offset by its position in the global
    batch (OpenCLIP's ``local_loss`` with gradients through the gather); the mean over
    processes is the global-batch loss. On one process this is exactly :func:`clip_loss`.
    """

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(ClipConfig, options, "clip")
        self.extra_keys = ("image_features_view2",) if self.cfg.image_view2 else ()

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        if not self.cfg.image_view2:
            return {"loss": self._pair(inputs.image_features, inputs)}
        view2 = self._pair(inputs.require("image_features_view2"), inputs)
        return {"loss": 0.5 * (self._pair(inputs.image_features, inputs) + view2), "view2": view2.detach()}

    def _pair(self, img: Tensor, inputs: LossInputs) -> Tensor:
        txt, scale = inputs.text_features, inputs.logit_scale
        eps, chunk = self.cfg.label_smoothing, self.cfg.chunk_size
        if inputs.world_size <= 1:
            return clip_loss(img, txt, scale, eps, chunk)
        check_pairs(img, txt, "clip")
        all_img = gather(img, inputs.rank, inputs.world_size)
        all_txt = gather(txt, inputs.rank, inputs.world_size)
        offset = local_offset(img.shape[0], inputs.rank)
        if chunk:
            return 0.5 * (chunked_row_cross_entropy(img, all_txt, scale, offset, eps, chunk)
                          + chunked_row_cross_entropy(txt, all_img, scale, offset, eps, chunk))
        labels = torch.arange(img.shape[0], device=img.device) + offset
        loss_i = F.cross_entropy(scale * img @ all_txt.t(), labels, label_smoothing=eps)
        loss_t = F.cross_entropy(scale * txt @ all_img.t(), labels, label_smoothing=eps)
        return 0.5 * (loss_i + loss_t)
