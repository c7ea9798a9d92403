"""CLOC: region-text contrast and text-to-box grounding next to the image-level loss.

Chen et al., "Contrastive Localized Language-Image Pre-training" (CLOC, 2024), Sec. 3: the total
objective is L_CLIP + L_region + L_grounding (this term is the last two; add ``clip`` beside it).
With r_j the normalized region embedding of box j (the Prompter, :mod:`clipforge.models.region_head`),
u_j the normalized embedding of box j's caption, t the logit scale and M the valid regions of the
(gathered) batch:

    L_region = 1/2 [ 1/|M| sum_{j in M} -log softmax_{k in M}(t r_j . u_k)[j]
                   + 1/|M| sum_{j in M} -log softmax_{k in M}(t u_j . r_k)[j] ]

the region-level InfoNCE over every region of the batch; and with b_hat_j the box the Prompter
grounds caption u_j to and b_j the true box,

    L_grounding = 1/|M| sum_{j in M} ( ||b_hat_j - b_j||_1 + 1 - GIoU(b_hat_j, b_j) )

    loss = region * L_region + grounding * L_grounding

Inputs (``LossInputs.extra``): ``region_features`` and ``region_text_features`` [B, R, d],
``region_mask`` [B, R] (True = a real region; padding slots are left out of every sum and softmax),
``grounded_boxes`` and ``region_boxes`` [B, R, 4] normalized xyxy; the training program makes them
from a dataset with regions (``shapes``, a region corpus; train/inputs.py).

Simplifications, stated: the region softmax uses the image-level logit scale; identical region
captions of different regions (two "a small red circle." in one batch) count as negatives of each
other, as identical image captions do in CLIP; the L1 and GIoU parts have weight 1 each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather
from .registry import register
from .validate import parse_options


def generalized_iou(a: Tensor, b: Tensor) -> Tensor:
    """GIoU of paired xyxy boxes [..., 4] (Rezatofighi et al., 2019): IoU - |C \\ (A u B)| / |C|."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    union = area_a + area_b - inter
    cw = torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])
    ch = torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    hull = cw * ch
    eps = 1e-7
    return inter / (union + eps) - (hull - union) / (hull + eps)


def _check(inputs: LossInputs) -> tuple[Tensor, ...]:
    regions, texts = inputs.require("region_features"), inputs.require("region_text_features")
    mask = inputs.require("region_mask").bool()
    grounded, boxes = inputs.require("grounded_boxes"), inputs.require("region_boxes")
    if regions.ndim != 3 or regions.shape != texts.shape:
        raise ValueError(f"cloc needs region_features and region_text_features of one shape [B, R, d], got "
                         f"{tuple(regions.shape)} and {tuple(texts.shape)}")
    if tuple(mask.shape) != tuple(regions.shape[:2]):
        raise ValueError(f"cloc's region_mask must be [B, R] = {tuple(regions.shape[:2])}, got {tuple(mask.shape)}")
    for name, b in (("grounded_boxes", grounded), ("region_boxes", boxes)):
        if tuple(b.shape) != (*regions.shape[:2], 4):
            raise ValueError(f"cloc's {name} must be [B, R, 4] = {(*regions.shape[:2], 4)}, got {tuple(b.shape)}")
    return regions, texts, mask, grounded, boxes


def gather_regions(features: tuple[Tensor, ...], mask: Tensor, rank: int = 0, world_size: int = 1,
                   term: str = "a region loss term") -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """The prologue every region term shares: each [B, R, d] tensor of ``features`` gathered across processes and
    flattened to [W*B*R, d]; the gathered [B, R] mask flattened (``valid``); the number of valid regions ``n``;
    and ``positions`` [W*B*R], each slot's column among the valid regions (the targets of a contrast over them;
    this process's slot (i, j) is row ``(rank * B + i) * R + j``). An empty gathered batch is refused, naming
    ``term``."""
    d = features[0].shape[-1]
    gathered = [gather(f, rank, world_size).reshape(-1, d) for f in features]
    valid = gather(mask.to(features[0].dtype), rank, world_size).reshape(-1).bool()
    n = valid.sum()
    if n == 0:
        raise ValueError(f"{term} got a batch without any region; train it on a dataset with regions (shapes, "
                         "shapes_long or a region corpus)")
    return gathered, valid, n, torch.cumsum(valid.long(), 0) - 1


def region_contrast(regions: Tensor, texts: Tensor, mask: Tensor, scale, rank: int = 0, world_size: int = 1,
                    term: str = "a region loss term") -> tuple[Tensor, Tensor]:
    """L_region, the symmetric region-text InfoNCE over the valid regions of the gathered batch, for [B, R, d]
    features and a [B, R] mask: returns (world_size x this process's share of it, the number of valid regions in
    the gathered batch), so the mean over processes is the one-process loss. Shared by CLOC and FG-CLIP 2."""
    (r_all, u_all), m_all, n, positions = gather_regions((regions, texts), mask, rank, world_size, term)
    local = mask.reshape(-1).bool()
    idx = torch.nonzero(local).reshape(-1) + rank * local.numel()  # global rows of this process's valid regions
    targets = positions[idx]
    r2u = F.cross_entropy(scale * r_all[idx] @ u_all[m_all].t(), targets, reduction="sum")
    u2r = F.cross_entropy(scale * u_all[idx] @ r_all[m_all].t(), targets, reduction="sum")
    return 0.5 * (r2u + u2r) * world_size / n, n


def cloc_loss(region_features: Tensor, region_text_features: Tensor, region_mask: Tensor, grounded_boxes: Tensor,
              region_boxes: Tensor, logit_scale, region: float = 1.0, grounding: float = 1.0, rank: int = 0,
              world_size: int = 1) -> dict[str, Tensor]:
    """The CLOC region and grounding terms (module docstring). Features [B, R, d] are local; with
    ``world_size > 1`` the regions of every process are gathered, and each process returns
    ``world_size`` x its share of the global sums, so the mean over processes is the one-process loss."""
    l_region, n = region_contrast(region_features, region_text_features, region_mask, logit_scale, rank, world_size,
                                  term="cloc")
    local = region_mask.reshape(-1).bool()
    pred, true = grounded_boxes.reshape(-1, 4)[local], region_boxes.reshape(-1, 4)[local].to(grounded_boxes.dtype)
    per = (pred - true).abs().sum(-1) + 1 - generalized_iou(pred, true)
    l_ground = per.sum() * world_size / n
    return {"loss": region * l_region + grounding * l_ground, "region": l_region.detach(),
            "grounding": l_ground.detach()}


@dataclass
class ClocConfig:
    region: float = 1.0  # weight of the region-text contrast L_region
    grounding: float = 1.0  # weight of the text-to-box grounding L_grounding

    def __post_init__(self):
        if self.region < 0 or self.grounding < 0 or self.region + self.grounding == 0:
            raise ValueError(f"cloc's region and grounding weights must be >= 0 and not both 0, got "
                             f"region={self.region}, grounding={self.grounding}")


@register("cloc")
class ClocLoss(nn.Module):
    """Registered :func:`cloc_loss`; options :class:`ClocConfig`. The model needs a region head
    (``model_overrides.region_head=true``; ``clipforge train`` adds one when this term is configured)."""

    extra_keys = ("region_features", "region_text_features", "grounded_boxes")
    needs_region_head = True

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(ClocConfig, options, "cloc")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        regions, texts, mask, grounded, boxes = _check(inputs)
        return cloc_loss(regions, texts, mask, grounded, boxes, inputs.logit_scale, self.cfg.region,
                         self.cfg.grounding, inputs.rank, inputs.world_size)
