"""clipforge.losses: the training objectives of CLIP and its successors, as composable terms.

``available()`` lists the registered names, ``build(name, **options)`` makes one,
``build_composite({"clip": 1.0, ...})`` makes a weighted sum. Functional forms work on
L2-normalized features with ``logit_scale`` already exponentiated.
"""
from __future__ import annotations

from typing import Any, Mapping

from .base import CompositeLoss, LossInputs
from .registry import LOSSES, available, build, register


def build_composite(spec: Mapping[str, Any]) -> CompositeLoss:
    """Build a weighted sum from ``{name: weight}`` or ``{name: {"weight": w, **options}}``."""
    terms, weights = {}, {}
    for name, value in spec.items():
        if isinstance(value, Mapping):
            opts = dict(value)
            weights[name] = float(opts.pop("weight", 1.0))
            kind = opts.pop("term", name)
        else:
            weights[name], opts, kind = float(value), {}, name
        terms[name] = build(kind, **opts)
    return CompositeLoss(terms, weights)


__all__ = ["LossInputs", "CompositeLoss", "LOSSES", "available", "build", "build_composite", "register"]

# importing a module registers its terms
# --- group A terms (one module per method) ---
from .clip import ClipConfig, ClipLoss, clip_loss  # noqa: E402  (group A: CLIP/SigLIP and contrastive variants)
from .siglip import SigLipConfig, SigLipLoss, siglip_loss  # noqa: E402
from .chunked import chunked_clip_loss, chunked_pairwise_sigmoid, chunked_row_cross_entropy  # noqa: E402
from .cloob import CloobConfig, CloobLoss, cloob_loss  # noqa: E402
from .cwcl import CwclConfig, CwclLoss, cwcl_loss  # noqa: E402
from .gap import AlignmentLoss, UniformityLoss, alignment_loss, uniformity_loss  # noqa: E402
from .m2mix import M2MixConfig, M2MixLoss, m2mix_loss, slerp  # noqa: E402
from .rafa import RafaConfig, RafaLoss, rafa_loss  # noqa: E402
from .simclr import SimclrConfig, SimclrLoss, nt_xent  # noqa: E402
from .symile import SymileConfig, SymileLoss, symile_loss  # noqa: E402

__all__ += ["ClipConfig", "ClipLoss", "clip_loss", "SigLipConfig", "SigLipLoss", "siglip_loss", "chunked_clip_loss",
            "chunked_pairwise_sigmoid", "chunked_row_cross_entropy", "CloobConfig", "CloobLoss", "cloob_loss",
            "CwclConfig", "CwclLoss", "cwcl_loss", "AlignmentLoss", "UniformityLoss", "alignment_loss",
            "uniformity_loss", "M2MixConfig", "M2MixLoss", "m2mix_loss", "slerp", "RafaConfig", "RafaLoss", "rafa_loss",
            "SimclrConfig", "SimclrLoss", "nt_xent", "SymileConfig", "SymileLoss", "symile_loss"]
# --- end group A ---

# --- group B terms (one module per method) ---
from .alip import AlipLoss, alip_loss  # noqa: E402  (group B: clustering, transport, multi-positive, captioning)
from .caption import CaptionLoss, caption_loss  # noqa: E402
from .dreamlip import DreamlipGroupingLoss, dreamlip_grouping_loss  # noqa: E402
from .kmeans import kmeans  # noqa: E402
from .mlcd import MlcdLoss, cluster_centers, mlcd_loss  # noqa: E402
from .multi_positive import MultiPositiveLoss, multi_positive_loss  # noqa: E402
from .norton import NortonConfig, NortonLoss, norton_loss, sinkhorn_log  # noqa: E402
from .protoclip import ProtoClipConfig, ProtoClipLoss, protoclip_loss  # noqa: E402
from .tic import TicLoss, tic_loss  # noqa: E402

__all__ += ["AlipLoss", "alip_loss", "CaptionLoss", "caption_loss", "DreamlipGroupingLoss", "dreamlip_grouping_loss",
            "kmeans", "MlcdLoss", "cluster_centers", "mlcd_loss", "MultiPositiveLoss", "multi_positive_loss",
            "NortonConfig", "NortonLoss", "norton_loss", "sinkhorn_log", "ProtoClipConfig", "ProtoClipLoss",
            "protoclip_loss", "TicLoss", "tic_loss"]
# --- end group B ---

# --- group C terms ---
from .counting import counting_loss  # noqa: E402  (group C: hard negatives and distillation)
from .dclip import cosine_distill_loss, dclip_loss  # noqa: E402
from .degla import grounded_contrast  # noqa: E402
from .distill_kl import distill_kl_loss  # noqa: E402
from .ema import EMATeacher, ema_distill_loss  # noqa: E402
from .hard_negative import hard_negative_loss  # noqa: E402
from .hqclip import hqclip_loss  # noqa: E402
from .hycd import hycd_loss  # noqa: E402
from .teachers import teacher_list  # noqa: E402

__all__ += ["counting_loss", "cosine_distill_loss", "dclip_loss", "grounded_contrast", "distill_kl_loss", "EMATeacher",
            "ema_distill_loss", "hard_negative_loss", "hqclip_loss", "hycd_loss", "teacher_list"]
# --- end group C ---

# --- model-variant terms ---
from .long_clip import LongClipConfig, LongClipLoss, long_clip_loss, pca_reconstruct  # noqa: E402  (Long-CLIP)

__all__ += ["LongClipConfig", "LongClipLoss", "long_clip_loss", "pca_reconstruct"]
from .moe_balance import MoEBalanceLoss  # noqa: E402  (CLIP-MoE's balance loss, from the model's forward)

__all__ += ["MoEBalanceLoss"]
# --- end model-variant terms ---
