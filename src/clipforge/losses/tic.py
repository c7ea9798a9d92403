"""TIC: textual intra-modal contrast (FG-CLIP 2, Xie et al., "FG-CLIP 2: A Bilingual Fine-grained
Vision-Language Alignment Model", 2025).

Captions that describe different things must stay apart in the text space even when they
are lexically close ("a red car on the left" / "a red car on the right"); image-text
contrast alone lets such captions collapse. TIC contrasts captions with captions. For
caption y_i, its negatives N_i are

- the ``top_k`` captions of the (gathered) batch most similar to it, leaving out itself and
  near-duplicates (cosine above ``duplicate_threshold``: the same description twice is not a
  negative), as FG-CLIP 2 does with k = 10 and threshold 0.95;
- its own hard text negatives, ``extra["negative_text_features"]`` [B, K, d] with optional
  ``extra["negative_text_mask"]`` [B, K] (e.g. one attribute or relation changed).

With s(a, b) = t a·b (t = ``scale``; FG-CLIP 2 uses the raw cosine, t = 1; ``scale=None``
uses the model's logit scale), TIC pushes the hardest similar captions away:

    L = mean_i log sum_{n in N_i} exp(s(y_i, n))

and, when a paraphrase of caption i is given (``extra["similar_text_features"]`` [B, d]: a
rewrite or second caption of the same image), it is the positive of an InfoNCE instead:

    L = mean_i -log [ exp(s(y_i, p_i)) / (exp(s(y_i, p_i)) + sum_{n in N_i} exp(s(y_i, n))) ]

A caption without any negative contributes 0. The top-k selection uses detached
similarities; gradients flow through the selected scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather, local_offset
from .registry import register
from .validate import parse_options


def batch_negatives(text_features: Tensor, all_texts: Tensor, offset: int, top_k: int,
                    duplicate_threshold: float) -> tuple[Tensor, Tensor]:
    """Cosines of each local caption to its top-k most similar other captions [b, k] and which are valid."""
    sims = text_features @ all_texts.t()
    rows = torch.arange(text_features.shape[0], device=sims.device)
    allowed = sims.detach() <= duplicate_threshold
    allowed[rows, rows + offset] = False
    k = min(top_k, all_texts.shape[0])
    idx = sims.detach().masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices
    return sims.gather(1, idx), allowed.gather(1, idx)


def tic_loss(text_features: Tensor, all_texts: Tensor | None = None, scale=1.0, negatives: Tensor | None = None,
             negative_mask: Tensor | None = None, positives: Tensor | None = None, offset: int = 0, top_k: int = 10,
             duplicate_threshold: float = 0.95) -> Tensor:
    """TIC of the local captions ``text_features`` [b, d] against the batch ``all_texts`` [B, d] (default: the
    local batch; this process's captions start at ``offset``), see the module docstring."""
    all_texts = text_features if all_texts is None else all_texts
    sims, valid = batch_negatives(text_features, all_texts, offset, top_k, duplicate_threshold)
    if negatives is not None:
        if negatives.ndim != 3 or negatives.shape[0] != text_features.shape[0]:
            raise ValueError(f"tic hard text negatives must be [B, K, d] with B = {text_features.shape[0]}, "
                             f"got {tuple(negatives.shape)}")
        keep = torch.ones(negatives.shape[:2], dtype=torch.bool, device=negatives.device) if negative_mask is None \
            else negative_mask.bool()
        sims = torch.cat([sims, torch.einsum("bd,bkd->bk", text_features, negatives)], dim=1)
        valid = torch.cat([valid, keep], dim=1)
    logits = (scale * sims).masked_fill(~valid, float("-inf"))
    if positives is not None:
        pos = scale * (text_features * positives).sum(-1, keepdim=True)
        return (torch.logsumexp(torch.cat([pos, logits], dim=1), dim=1) - pos[:, 0]).mean()
    lse = torch.logsumexp(logits, dim=1)
    return torch.where(valid.any(1), lse, torch.zeros_like(lse)).mean()


@dataclass
class TicConfig:
    top_k: int = 10  # most similar other captions each caption pushes away
    duplicate_threshold: float = 0.95  # captions more similar than this are near-duplicates, not negatives
    scale: float | None = 1.0  # None: the model's logit scale
    negatives_key: str | None = "negative_text_features"  # hard captions the training program encodes; None: batch only
    positive_key: str = "similar_text_features"  # a paraphrase as positive, used when present

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"tic top_k must be >= 1, got {self.top_k}")


@register("tic")
class TicLoss(nn.Module):
    """Registered :func:`tic_loss`: batch-global (captions are gathered across processes).
    Options: :class:`TicConfig`."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(TicConfig, options, "tic")
        self.extra_keys = (self.cfg.negatives_key,) if self.cfg.negatives_key else ()

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        txt = inputs.text_features
        negatives = mask = None
        cfg = self.cfg
        if cfg.negatives_key:
            negatives = inputs.require(cfg.negatives_key)
            mask = inputs.extra.get(cfg.negatives_key.replace("features", "mask"))
        scale = inputs.logit_scale if cfg.scale is None else cfg.scale
        return {"loss": tic_loss(txt, gather(txt, inputs.rank, inputs.world_size), scale, negatives, mask,
                                 inputs.extra.get(cfg.positive_key), local_offset(txt.shape[0], inputs.rank),
                                 cfg.top_k, cfg.duplicate_threshold)}
