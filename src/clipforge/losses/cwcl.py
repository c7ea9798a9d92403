"""CWCL: Continuously Weighted Contrastive Loss (Srinivasa et al., "CWCL: Cross-Modal Transfer
with Continuously Weighted Contrastive Loss", 2023).

One tower is aligned to a frozen, already meaningful reference modality (LiT-style: the
paper's image-text models freeze a pre-trained image tower and train the text tower). CLIP's
one-hot targets call every other sample a negative even when the reference embeddings say it
is similar. CWCL instead weights every pair by the reference modality's intra-modal
similarity, mapped to [0, 1],

    w_ij = (1 + r_i·r_j) / 2        (w_ii = 1 for normalized r),

and uses the normalized weights as a soft target of the cross-modal softmax. With p the
trained modality, r the reference modality and t the logit scale, the two directions are

    L_{p->r} = -1/N sum_i 1/(sum_j w_ij) sum_j w_ij log softmax_j(t p_i·r_j)
    L_{r->p} = -1/N sum_i 1/(sum_j w_ij) sum_j w_ij log softmax_j(t r_i·p_j)

and the loss is their mean (``symmetric=True``, our reading of the paper's use of both
directions, as in CLIP; ``symmetric=False`` keeps L_{p->r} only). The weights never receive
gradient: they come from the reference features detached, or, with ``weights_key``, from
other features in ``LossInputs.extra`` (e.g. a frozen teacher's ``teacher_image_features``)
when neither tower is frozen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather
from .registry import register
from .validate import check_pairs, parse_options


@dataclass
class CwclConfig:
    reference: str = "image"  # the frozen modality: "image" (the paper's image-text setting) or "text"
    symmetric: bool = True  # mean of both directions; False: trained modality -> reference only
    weights_key: str | None = None  # extra[...] features [B, d'] to compute w from instead of the reference

    def __post_init__(self):
        if self.reference not in ("image", "text"):
            raise ValueError(f"cwcl reference must be 'image' or 'text', got {self.reference!r}")


def cwcl_weights(rows: Tensor, cols: Tensor) -> Tensor:
    """w_ij = (1 + a_i·a_j) / 2 from normalized reference features, without gradient."""
    if rows.ndim != 2 or cols.ndim != 2 or rows.shape[1] != cols.shape[1]:
        raise ValueError(f"cwcl weight features must be [B, d'] matrices, got {tuple(rows.shape)} and "
                         f"{tuple(cols.shape)}")
    rows, cols = F.normalize(rows.detach(), dim=-1), F.normalize(cols.detach(), dim=-1)
    return (1 + rows @ cols.t()) / 2


def weighted_contrastive(queries: Tensor, keys: Tensor, weights: Tensor, scale) -> Tensor:
    """Mean over rows of -sum_j w_ij log softmax_j(t q_i·k_j) / sum_j w_ij."""
    logp = torch.log_softmax(scale * queries @ keys.t(), dim=-1)
    return (-(weights * logp).sum(-1) / weights.sum(-1)).mean()


def cwcl_loss(image_features: Tensor, text_features: Tensor, logit_scale, reference: str = "image",
              symmetric: bool = True, weight_features: Tensor | None = None) -> Tensor:
    """CWCL on one batch; ``weight_features`` ([B, d']) replaces the reference features as the source of w."""
    check_pairs(image_features, text_features, "cwcl")
    cfg = CwclConfig(reference, symmetric)
    p, r = _roles(image_features, text_features, cfg.reference)
    source = _weight_source(r, weight_features)
    w = cwcl_weights(source, source)
    loss = weighted_contrastive(p, r, w, logit_scale)
    return 0.5 * (loss + weighted_contrastive(r, p, w, logit_scale)) if symmetric else loss


def _roles(image: Tensor, text: Tensor, reference: str) -> tuple[Tensor, Tensor]:
    """(trained modality p, reference modality r)."""
    return (text, image) if reference == "image" else (image, text)


def _weight_source(reference: Tensor, weight_features: Tensor | None) -> Tensor:
    """The features w is computed from: the reference modality, or the given ones (one row per pair)."""
    if weight_features is None:
        return reference
    if weight_features.shape[0] != reference.shape[0]:
        raise ValueError(f"cwcl weight features need one row per pair ({reference.shape[0]}), "
                         f"got {tuple(weight_features.shape)}")
    return weight_features


@register("cwcl")
class CwclLoss(nn.Module):
    """Registered :func:`cwcl_loss` (options: :class:`CwclConfig`): local rows against the gathered
    candidates, weights between each local row and every global candidate; the mean over
    processes is the global-batch loss."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(CwclConfig, options, "cwcl")
        self.extra_keys = (self.cfg.weights_key,) if self.cfg.weights_key else ()

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        cfg, scale = self.cfg, inputs.logit_scale
        source = inputs.require(cfg.weights_key) if cfg.weights_key else None
        if inputs.world_size <= 1:
            return {"loss": cwcl_loss(inputs.image_features, inputs.text_features, scale, cfg.reference, cfg.symmetric,
                                      source)}
        check_pairs(inputs.image_features, inputs.text_features, "cwcl")
        p, r = _roles(inputs.image_features, inputs.text_features, cfg.reference)
        source = _weight_source(r, source)
        all_p, all_r = gather(p, inputs.rank, inputs.world_size), gather(r, inputs.rank, inputs.world_size)
        w = cwcl_weights(source, gather(source.detach(), inputs.rank, inputs.world_size))
        loss = weighted_contrastive(p, all_r, w, scale)
        if cfg.symmetric:
            loss = 0.5 * (loss + weighted_contrastive(r, all_p, w, scale))
        return {"loss": loss}
