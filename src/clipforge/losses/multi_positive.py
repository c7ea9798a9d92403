"""Multi-positive contrast: several positive texts per image, such as the sub-captions of a long
synthetic caption (DreamLIP, Zheng et al. 2024) or LLM rewrites of the caption (LaCLIP, Fan
et al. 2023).

``extra["positive_text_features"]`` is [B, P, d] with ``extra["positive_text_mask"]`` [B, P]
(True = a real text; every image needs at least one). Write y_ip for the p-th positive of
image i, P_i for the valid slots of image i and t for the logit scale. Two forms:

``mode="joint"`` (one softmax over every valid text of the batch, the multi-positive InfoNCE
of UniCL/SupCon): each positive of image i is scored against all texts T of the batch,

    L_i2t = mean_i 1/|P_i| sum_{p in P_i} -log softmax_{y in T}(t x_i·y)[y_ip]
    L_t2i = mean_i 1/|P_i| sum_{p in P_i} -log softmax_j(t y_ip·x_j)[i]

``mode="per_slot"`` (DreamLIP's multi-positive loss and LaCLIP: one CLIP loss per
sub-caption slot, so the positives of an image never compete with each other): for slot p
the candidates of image i are the slot-p texts {y_jp} of the batch,

    L_i2t = mean_i 1/|P_i| sum_{p in P_i} -log softmax_{j: p in P_j}(t x_i·y_jp)[i]
    L_t2i = as in "joint"

and L = (L_i2t + L_t2i) / 2. With P = 1 both are the CLIP loss. Each image's positives are
averaged first, so every process holding B images computes its part of the global mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather, local_offset
from .registry import register
from .validate import parse_options

MODES = ("joint", "per_slot")


def _excluded(logits: Tensor) -> float:
    """Logit of a padded text: finite (a slot empty in the whole batch must not produce NaN gradients), never chosen."""
    return torch.finfo(logits.dtype).min


def _mean_over_positives(values: Tensor, mask: Tensor) -> Tensor:
    """mean_i of the mean of ``values`` [b, P] over each row's valid slots."""
    return (values.masked_fill(~mask, 0).sum(-1) / mask.sum(-1)).mean()


def multi_positive_loss(image_features: Tensor, positive_texts: Tensor, logit_scale, mask: Tensor | None = None,
                        all_images: Tensor | None = None, all_texts: Tensor | None = None,
                        all_mask: Tensor | None = None, offset: int = 0, mode: str = "joint") -> Tensor:
    """Local images [b, d] and their positives [b, P, d] as queries; ``all_*`` are the gathered candidates
    (default: the local batch) in which this process's samples start at ``offset``."""
    if mode not in MODES:
        raise ValueError(f"multi_positive mode must be one of {MODES}, got {mode!r}")
    b, p, d = positive_texts.shape
    if image_features.shape != (b, d):
        raise ValueError(f"positive_text_features must be [B, P, d] = [{image_features.shape[0]}, P, "
                         f"{image_features.shape[1]}], got {tuple(positive_texts.shape)}")
    mask = torch.ones(b, p, dtype=torch.bool, device=positive_texts.device) if mask is None else mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("every image needs at least one positive text (a row of positive_text_mask is all False)")
    all_images = image_features if all_images is None else all_images
    all_texts = positive_texts if all_texts is None else all_texts
    all_mask = mask if all_mask is None else all_mask.bool()
    rows = torch.arange(b, device=image_features.device)
    if mode == "joint":
        logits = logit_scale * image_features @ all_texts.reshape(-1, d).t()
        logp = logits.masked_fill(~all_mask.reshape(1, -1), _excluded(logits)).log_softmax(-1)
        own = logp.reshape(b, -1, p)[rows, rows + offset]  # [b, P]: image i against its own positives
    else:
        logits = logit_scale * torch.einsum("id,jpd->pij", image_features, all_texts)  # [P, b, B]
        logp = logits.masked_fill(~all_mask.t()[:, None, :], _excluded(logits)).log_softmax(-1)
        own = logp[:, rows, rows + offset].t()  # [b, P]
    i2t = _mean_over_positives(-own, mask)
    owner = (rows + offset).repeat_interleave(p)
    ce = F.cross_entropy(logit_scale * positive_texts.reshape(b * p, d) @ all_images.t(), owner, reduction="none")
    t2i = _mean_over_positives(ce.reshape(b, p), mask)
    return 0.5 * (i2t + t2i)


@dataclass
class MultiPositiveConfig:
    mode: str = "joint"  # "joint": one softmax over all texts; "per_slot": one CLIP loss per slot

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"multi_positive mode must be one of {MODES}, got {self.mode!r}")


@register("multi_positive")
class MultiPositiveLoss(nn.Module):
    """Registered :func:`multi_positive_loss` (batch-global; options: :class:`MultiPositiveConfig`)."""

    extra_keys = ("positive_text_features",)

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(MultiPositiveConfig, options, "multi_positive")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        pos = inputs.require("positive_text_features")
        mask = inputs.extra.get("positive_text_mask")
        if mask is None:
            mask = torch.ones(pos.shape[:2], dtype=torch.bool, device=pos.device)
        r, w = inputs.rank, inputs.world_size
        img = inputs.image_features
        return {"loss": multi_positive_loss(img, pos, inputs.logit_scale, mask, gather(img, r, w), gather(pos, r, w),
                                            gather(mask.to(img.dtype), r, w).bool(), local_offset(img.shape[0], r),
                                            self.cfg.mode)}
