"""FG-CLIP 2 region terms: region-text contrast, region hard negatives and the long-caption branch.

Xie et al., "FG-CLIP 2: A Bilingual Fine-grained Vision-Language Alignment Model" (2025), following
FG-CLIP (Xie et al., 2025), Sec. 3: region features are RoIAlign-pooled from the image tower's dense
(patch) features at the annotated boxes and aligned with the region captions; each region caption
also has hard negatives that change one attribute; a long caption is aligned with the whole image
beside the short one. (The textual intra-modal contrast of FG-CLIP 2 is the separate ``tic`` term.)

With P the projected patch tokens of an image, b_j the box of region j, r_j = normalize(mean
RoIAlign(P, b_j)) (an s x s bilinear grid, :func:`roi_region_features`), u_j
its region caption's embedding, n_jk its K attribute-changed negatives (mask m_jk), t the logit
scale, M the valid regions of the gathered batch, x_i / l_i the image and long-caption embeddings:

    L_region = 1/2 [ 1/|M| sum_{j in M} -log softmax_{k in M}(t r_j . u_k)[j]
                   + 1/|M| sum_{j in M} -log softmax_{k in M}(t u_j . r_k)[j] ]
    L_hard   = 1/|M| sum_{j in M} -log [ e^{t r_j.u_j} / (e^{t r_j.u_j} + sum_k m_jk e^{t r_j.n_jk}) ]
    L_long   = CLIP's symmetric InfoNCE of (x_i, l_i) over the gathered batch

    loss = region * L_region + hard * L_hard + long * L_long

Simplifications, stated: one logit scale (the model's) for every part; the region feature is the
mean of the RoIAlign grid with no extra region projection; negatives come from clipforge's rule
generators (clipforge.data.regions.region_negative_captions: one attribute or the object word
changed), not from an LLM; the long caption goes through the model's own text tower at its
context length (no position interpolation here; combine with ``long_context_factor`` for that).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .cloc import region_contrast
from .gather import gather, local_offset
from .registry import register
from .validate import parse_options


def roi_region_features(image_tokens: Tensor, boxes: Tensor, size: int = 2) -> Tensor:
    """Normalized region features [B, R, d]: the mean of a ``size`` x ``size`` RoIAlign grid of each box
    [B, R, 4] (normalized xyxy) over the square grid of projected patch tokens [B, N, d]. Bin (i, j) is
    sampled bilinearly at its center, patch k's feature sits at the patch center ((k + 0.5) / g) and the
    border patch's value extends beyond it: the convention of the region head's ``roi_align``
    (clipforge.models.region_head), which the tests check this against."""
    b, n, c = image_tokens.shape
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"fgclip_region needs a square patch grid, got {n} patch tokens")
    if boxes.ndim != 3 or boxes.shape[0] != b or boxes.shape[-1] != 4:
        raise ValueError(f"region boxes must be [B, R, 4] (normalized x0, y0, x1, y1) with B = {b}, "
                         f"got {tuple(boxes.shape)}")
    if (boxes < 0).any() or (boxes > 1).any() or (boxes[..., 2] <= boxes[..., 0]).any() \
            or (boxes[..., 3] <= boxes[..., 1]).any():
        raise ValueError("a region box lies outside the image or is empty; boxes are normalized x0 < x1, y0 < y1 "
                         "in [0, 1]")
    boxes = boxes.to(image_tokens.dtype)
    steps = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) / size
    xs = boxes[..., 0:1] + steps * (boxes[..., 2:3] - boxes[..., 0:1])  # [B, R, s]
    ys = boxes[..., 1:2] + steps * (boxes[..., 3:4] - boxes[..., 1:2])
    r = boxes.shape[1]
    points = torch.stack([xs[:, :, None, :].expand(-1, -1, size, -1), ys[:, :, :, None].expand(-1, -1, -1, size)], -1)
    grid = image_tokens.transpose(1, 2).reshape(b, c, g, g)
    pooled = F.grid_sample(grid, points.reshape(b, r, size * size, 2) * 2 - 1, mode="bilinear",
                           padding_mode="border", align_corners=False)  # [B, C, R, s*s]
    return F.normalize(pooled.mean(-1).transpose(1, 2), dim=-1)


def global_infonce(a: Tensor, b: Tensor, scale, rank: int = 0, world_size: int = 1) -> Tensor:
    """Symmetric InfoNCE of paired local rows a, b [n, d] against the gathered batch: each process returns
    its share of the global mean times ``world_size`` (the mean over processes is the one-process loss)."""
    a_all, b_all = gather(a, rank, world_size), gather(b, rank, world_size)
    labels = torch.arange(a.shape[0], device=a.device) + local_offset(a.shape[0], rank)
    return 0.5 * (F.cross_entropy(scale * a @ b_all.t(), labels) + F.cross_entropy(scale * b @ a_all.t(), labels))


def fgclip_region_loss(region_features: Tensor, region_text_features: Tensor, region_mask: Tensor, logit_scale,
                       negatives: Tensor | None = None, negative_mask: Tensor | None = None,
                       image_features: Tensor | None = None, long_text_features: Tensor | None = None,
                       region: float = 1.0, hard: float = 1.0, long: float = 1.0, rank: int = 0,
                       world_size: int = 1) -> dict[str, Tensor]:
    """The FG-CLIP 2 region terms of the module docstring; region features [B, R, d] are local, every
    sum is normalized by the gathered batch's region (or sample) count."""
    mask = region_mask.bool()
    l_region, n = region_contrast(region_features, region_text_features, mask, logit_scale, rank, world_size)
    total = region * l_region
    out = {"region": l_region.detach()}
    if hard:
        if negatives is None:
            raise ValueError("fgclip_region's hard part needs region_negative_text_features [B, R, K, d]")
        keep = torch.ones(negatives.shape[:3], dtype=torch.bool, device=negatives.device) \
            if negative_mask is None else negative_mask.bool()
        pos = logit_scale * (region_features * region_text_features).sum(-1, keepdim=True)  # [B, R, 1]
        neg = (logit_scale * torch.einsum("brd,brkd->brk", region_features, negatives)).masked_fill(~keep, -torch.inf)
        per = torch.logsumexp(torch.cat([pos, neg], -1), -1) - pos[..., 0]
        l_hard = per[mask].sum() * world_size / n
        total = total + hard * l_hard
        out["hard"] = l_hard.detach()
    if long:
        if image_features is None or long_text_features is None:
            raise ValueError("fgclip_region's long part needs image_features and long_text_features [B, d]")
        l_long = global_infonce(image_features, long_text_features, logit_scale, rank, world_size)
        total = total + long * l_long
        out["long"] = l_long.detach()
    return {"loss": total, **out}


@dataclass
class FgclipRegionConfig:
    region: float = 1.0  # weight of the region-text contrast
    hard: float = 1.0  # weight of the region hard-negative term (data.hard_negatives negatives per region caption)
    long: float = 1.0  # weight of the image / long-caption contrast
    roi_size: int = 2  # s: the s x s RoIAlign samples per box

    def __post_init__(self):
        if min(self.region, self.hard, self.long) < 0 or self.region + self.hard + self.long == 0:
            raise ValueError(f"fgclip_region's weights region, hard, long must be >= 0 and not all 0, got "
                             f"region={self.region}, hard={self.hard}, long={self.long}")
        if self.roi_size < 1:
            raise ValueError(f"fgclip_region roi_size must be >= 1, got {self.roi_size}")


@register("fgclip_region")
class FgclipRegionLoss(nn.Module):
    """Registered :func:`fgclip_region_loss`; options :class:`FgclipRegionConfig`. Region features are
    pooled from the model's projected patch tokens (``image_tokens``): no region head is needed."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(FgclipRegionConfig, options, "fgclip_region")
        keys = ["image_tokens", "region_text_features"]
        if self.cfg.hard:
            keys.append("region_negative_text_features")
        if self.cfg.long:
            keys.append("long_text_features")
        self.extra_keys = tuple(keys)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        tokens, texts = inputs.require("image_tokens"), inputs.require("region_text_features")
        boxes, mask = inputs.require("region_boxes"), inputs.require("region_mask")
        b_r = tuple(texts.shape[:2])
        if texts.ndim != 3 or tuple(boxes.shape) != (*b_r, 4) or tuple(mask.shape) != b_r:
            raise ValueError(f"fgclip_region needs region_text_features [B, R, d], region_boxes [B, R, 4] and "
                             f"region_mask [B, R] of one B and R, got {tuple(texts.shape)}, {tuple(boxes.shape)} and "
                             f"{tuple(mask.shape)}")
        regions = roi_region_features(tokens, boxes, self.cfg.roi_size)
        cfg = self.cfg
        negatives = inputs.require("region_negative_text_features") if cfg.hard else None
        long = inputs.require("long_text_features") if cfg.long else None
        return fgclip_region_loss(regions, texts, mask, inputs.logit_scale, negatives,
                                  inputs.extra.get("region_negative_mask"), inputs.image_features, long,
                                  cfg.region, cfg.hard, cfg.long, inputs.rank, inputs.world_size)
