"""HQ-CLIP's use of richer text supervision (Wei et al., "HQ-CLIP: Leveraging Large
Vision-Language Models to Create High-Quality Image-Text Datasets and CLIP Models", 2025).

Besides its long description y_i, each image has a short tag text s_i
(``extra["short_tag_features"]`` [B, d]) that is a second positive, and negative descriptions
n_i1..n_iK (``extra["negative_text_features"]`` [B, K, d], optional mask) that describe
what the image is not. Image i's candidates are every description and tag in the batch plus
its own negative descriptions; both of its positives are targets with weight 1/2:

    L_i2t = mean_i -1/2 [ log softmax(t x_i·C)[y_i] + log softmax(t x_i·C)[s_i] ],  C = {y_j} ∪ {s_j} ∪ {n_ik}
    L_t2i = mean over texts u in {y_i, s_i} of CE(t u·x, i)
    L = (L_i2t + L_t2i) / 2

With ``negatives=true`` the training program feeds the negative descriptions: each sample's
``negative_descriptions`` caption source (clipforge.data.captions.source_negatives), drawn with
its other typed negatives as ``data.hard_negatives`` says.

This is our reading of the paper's "negative descriptions and short tags as additional
supervised signals" in contrastive form (we could check the abstract, not the paper's code):
tags enter as second positives rather than through a separate tag-classification head.
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


def hqclip_loss(image_features: Tensor, text_features: Tensor, tag_features: Tensor, logit_scale,
                negatives: Tensor | None = None, negative_mask: Tensor | None = None, all_images: Tensor | None = None,
                all_texts: Tensor | None = None, all_tags: Tensor | None = None, offset: int = 0) -> Tensor:
    """HQ-CLIP's contrast with short-tag positives and negative descriptions: image i scores
    every description and tag (plus its own negative descriptions) and splits its target
    evenly between y_i and s_i; each description and tag must find its image (module docstring).

    Local rows; ``all_*`` are the gathered candidates (default: the local batch), this process's at ``offset``."""
    b = image_features.shape[0]
    all_images = image_features if all_images is None else all_images
    all_texts = text_features if all_texts is None else all_texts
    all_tags = tag_features if all_tags is None else all_tags
    big_b = all_texts.shape[0]
    idx = torch.arange(b, device=image_features.device) + offset
    logits = logit_scale * image_features @ torch.cat([all_texts, all_tags]).t()  # [b, 2B]
    if negatives is not None:
        neg = logit_scale * torch.einsum("bd,bkd->bk", image_features, negatives)
        if negative_mask is not None:
            neg = neg.masked_fill(~negative_mask.bool(), float("-inf"))
        logits = torch.cat([logits, neg], dim=1)
    logp = logits.log_softmax(-1)
    rows = torch.arange(b, device=image_features.device)
    i2t = -0.5 * (logp[rows, idx] + logp[rows, big_b + idx]).mean()
    t2i_logits = logit_scale * torch.cat([text_features, tag_features]) @ all_images.t()
    t2i = F.cross_entropy(t2i_logits, torch.cat([idx, idx]))
    return 0.5 * (i2t + t2i)


@dataclass
class HqClipConfig:
    """``negatives``: read the negative descriptions (``extra["negative_text_features"]``); the training
    program then draws ``data.hard_negatives`` of each sample's negatives, its ``negative_descriptions``
    among them (typed "description"; ``data.negative_types=[description]`` keeps only those)."""

    negatives: bool = False

    def __post_init__(self):
        if not isinstance(self.negatives, bool):
            raise ValueError(f"hqclip negatives must be true or false, got {self.negatives!r}")


@register("hqclip")
class HqClipLoss(nn.Module):
    """Registered :func:`hqclip_loss`, global over the gathered batch; negative descriptions optional."""

    extra_keys = ("short_tag_features",)

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(HqClipConfig, options, "hqclip")
        if self.cfg.negatives:
            self.extra_keys = ("short_tag_features", "negative_text_features")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        ex, r, w = inputs.extra, inputs.rank, inputs.world_size
        img, txt, tag = inputs.image_features, inputs.text_features, inputs.require("short_tag_features")
        negatives = inputs.require("negative_text_features") if self.cfg.negatives else ex.get("negative_text_features")
        return {"loss": hqclip_loss(img, txt, tag, inputs.logit_scale, negatives,
                                    ex.get("negative_text_mask"), gather(img, r, w), gather(txt, r, w),
                                    gather(tag, r, w), local_offset(img.shape[0], r))}
