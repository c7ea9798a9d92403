"""DreamLIP's subcaption-specific grouping loss (Zheng et al., "DreamLIP: Language-Image
Pre-training with Long Captions", ECCV 2024).

A long caption is split into sub-captions; each sub-caption describes a part of its image,
so it is matched with the patches it talks about rather than with the whole image. For
sub-caption s of image i (features ``extra["positive_text_features"]`` [B, P, d] with
``extra["positive_text_mask"]`` [B, P], the same input as ``multi_positive``) and the
patch tokens p_i1..p_iN of its own image (``image_tokens`` [B, N, d], projected to the joint
space; both normalized here):

    a_n = (s·p_in - min_m s·p_im) / (max_m s·p_im - min_m s·p_im)     (min-max, "minmax")
          or softmax_n(s·p_in)                                          ("softmax")
    a_n = 0 where a_n < delta  (sparsification; delta < 0 means delta = 1/N)
    g_s = normalize( sum_n a_n p_in / sum_n a_n )                        (grouped region feature)

Every valid sub-caption and its grouped feature then form a positive pair among all the
batch's sub-captions S (a sub-caption must find its own region, and the region its own
sub-caption), with scale t:

    L = 1/(2|S|) sum_{s in S} [ -log softmax_{s'}(t s·g_{s'})[s] - log softmax_{s'}(t g_s·s')[s] ]

The grouping weights are differentiable functions of the features (no stop-gradient), as in
DreamLIP. Batch-global: sub-captions and grouped features are gathered across processes and
each process adds the terms of its own sub-captions, normalized by the global count |S|.
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

NORMS = ("minmax", "softmax")


def grouping_weights(sub_captions: Tensor, patches: Tensor, norm: str = "minmax", delta: float = 0.1) -> Tensor:
    """Sparse weights [S, N] of each sub-caption [S, d] over its own image's patches [S, N, d], rows summing to 1."""
    if norm not in NORMS:
        raise ValueError(f"dreamlip_grouping norm must be one of {NORMS}, got {norm!r}")
    sim = torch.einsum("sd,snd->sn", sub_captions, patches)
    if norm == "minmax":
        low, high = sim.min(-1, keepdim=True).values, sim.max(-1, keepdim=True).values
        a = (sim - low) / (high - low + 1e-10)
    else:
        a = sim.softmax(-1)
    threshold = 1.0 / patches.shape[1] if delta < 0 else delta
    a = torch.where(a < threshold, torch.zeros_like(a), a)
    return a / a.sum(-1, keepdim=True).clamp(min=1e-12)


def grouped_features(sub_captions: Tensor, image_tokens: Tensor, norm: str = "minmax", delta: float = 0.1) -> Tensor:
    """g [B, P, d]: each sub-caption's grouped region feature from its own image's patch tokens [B, N, d]."""
    b, p, d = sub_captions.shape
    patches = image_tokens.repeat_interleave(p, dim=0)  # [B*P, N, d]: sub-caption (i, k) sees image i's patches
    w = grouping_weights(sub_captions.reshape(b * p, d), patches, norm, delta)
    return F.normalize(torch.einsum("sn,snd->sd", w, patches), dim=-1).reshape(b, p, d)


def dreamlip_grouping_loss(sub_captions: Tensor, image_tokens: Tensor, logit_scale, mask: Tensor | None = None,
                           norm: str = "minmax", delta: float = 0.1,
                           gathered: tuple[Tensor, Tensor, Tensor] | None = None,
                           offset: int = 0, world_size: int = 1, groups: Tensor | None = None) -> Tensor:
    """The grouping loss of the local sub-captions [b, P, d] (module docstring). ``gathered``: all processes'
    (sub-captions [B, P, d], grouped features [B, P, d], mask [B, P]); this process's images start at ``offset``;
    ``groups``: the local grouped features when already computed."""
    b, p, d = sub_captions.shape
    if image_tokens.ndim != 3 or image_tokens.shape[0] != b or image_tokens.shape[2] != d:
        raise ValueError(f"dreamlip_grouping needs image_tokens [B, N, d] = [{b}, N, {d}], "
                         f"got {tuple(image_tokens.shape)}")
    mask = torch.ones(b, p, dtype=torch.bool, device=sub_captions.device) if mask is None else mask.bool()
    groups = grouped_features(sub_captions, image_tokens, norm, delta) if groups is None else groups
    all_subs, all_groups, all_mask = gathered if gathered is not None else (sub_captions, groups, mask)
    all_subs, all_groups, valid = all_subs.reshape(-1, d), all_groups.reshape(-1, d), all_mask.reshape(-1).bool()
    if not valid.any():
        raise ValueError("dreamlip_grouping: no valid sub-caption in the batch (positive_text_mask is all False)")
    excluded = torch.finfo(all_subs.dtype).min
    targets = torch.arange(b * p, device=sub_captions.device) + offset * p
    t2g = logit_scale * sub_captions.reshape(b * p, d) @ all_groups.t()
    g2t = logit_scale * groups.reshape(b * p, d) @ all_subs.t()
    ce = [F.cross_entropy(z.masked_fill(~valid[None], excluded), targets, reduction="none") for z in (t2g, g2t)]
    per_row = 0.5 * (ce[0] + ce[1])
    return world_size * per_row.masked_fill(~mask.reshape(-1), 0).sum() / valid.sum()


@dataclass
class DreamlipGroupingConfig:
    norm: str = "minmax"  # how patch similarities become weights: one of NORMS
    delta: float = 0.1  # weights below it are zeroed (< 0: 1/N)
    scale: float | None = None  # None: the model's logit scale (DreamLIP learns a separate one for this loss)

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"dreamlip_grouping norm must be one of {NORMS}, got {self.norm!r}")


@register("dreamlip_grouping")
class DreamlipGroupingLoss(nn.Module):
    """Registered :func:`dreamlip_grouping_loss` (options: :class:`DreamlipGroupingConfig`)."""

    extra_keys = ("positive_text_features", "image_tokens")

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(DreamlipGroupingConfig, options, "dreamlip_grouping")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        r, w = inputs.rank, inputs.world_size
        subs = F.normalize(inputs.require("positive_text_features"), dim=-1)
        tokens = F.normalize(inputs.require("image_tokens"), dim=-1)
        mask = inputs.extra.get("positive_text_mask")
        mask = torch.ones(subs.shape[:2], dtype=torch.bool, device=subs.device) if mask is None else mask.bool()
        groups = grouped_features(subs, tokens, self.cfg.norm, self.cfg.delta)
        gathered = (gather(subs, r, w), gather(groups, r, w), gather(mask.to(subs.dtype), r, w).bool())
        scale = inputs.logit_scale if self.cfg.scale is None else self.cfg.scale
        return {"loss": dreamlip_grouping_loss(subs, tokens, scale, mask, self.cfg.norm, self.cfg.delta, gathered,
                                               local_offset(subs.shape[0], r), w, groups)}
