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
# --- CLIP, SigLIP and contrastive variants (one module per method) ---
# the self-supervised companions of "Improved baselines for vision-language pre-training" (Fini et al. 2023)
from .barlow_twins import BarlowTwinsConfig, BarlowTwinsLoss, barlow_twins_loss  # noqa: E402
from .byol import ByolConfig, ByolLoss, byol_loss  # noqa: E402
from .chunked import chunked_clip_loss, chunked_pairwise_sigmoid, chunked_row_cross_entropy  # noqa: E402
from .clip import ClipConfig, ClipLoss, clip_loss  # noqa: E402
from .cloob import CloobConfig, CloobLoss, cloob_loss  # noqa: E402
from .cwcl import CwclConfig, CwclLoss, cwcl_loss  # noqa: E402
from .gap import AlignmentLoss, UniformityLoss, alignment_loss, uniformity_loss  # noqa: E402
from .m2mix import M2MixConfig, M2MixLoss, m2mix_loss, slerp  # noqa: E402
from .rafa import RafaConfig, RafaLoss, rafa_loss  # noqa: E402
from .siglip import SigLipConfig, SigLipLoss, siglip_loss  # noqa: E402
from .simclr import SimclrConfig, SimclrLoss, nt_xent  # noqa: E402
from .swav import SwavConfig, SwavLoss, sinkhorn_codes, swapped_prediction, swav_loss  # noqa: E402
from .symile import SymileConfig, SymileLoss, symile_loss  # noqa: E402

__all__ += ["ClipConfig", "ClipLoss", "clip_loss", "SigLipConfig", "SigLipLoss", "siglip_loss", "chunked_clip_loss",
            "chunked_pairwise_sigmoid", "chunked_row_cross_entropy", "CloobConfig", "CloobLoss", "cloob_loss",
            "CwclConfig", "CwclLoss", "cwcl_loss", "AlignmentLoss", "UniformityLoss", "alignment_loss",
            "uniformity_loss", "M2MixConfig", "M2MixLoss", "m2mix_loss", "slerp", "RafaConfig", "RafaLoss", "rafa_loss",
            "SimclrConfig", "SimclrLoss", "nt_xent", "SymileConfig", "SymileLoss", "symile_loss",
            "BarlowTwinsConfig", "BarlowTwinsLoss", "barlow_twins_loss", "ByolConfig", "ByolLoss", "byol_loss",
            "SwavConfig", "SwavLoss", "sinkhorn_codes", "swapped_prediction", "swav_loss"]
# --- end CLIP, SigLIP and contrastive variants ---

# --- clustering, transport, multi-positive and captioning (one module per method) ---
from .alip import AlipConfig, AlipLoss, alip_loss  # noqa: E402
from .caption import CaptionConfig, CaptionLoss, caption_loss  # noqa: E402
from .dreamlip import DreamlipGroupingConfig, DreamlipGroupingLoss, dreamlip_grouping_loss  # noqa: E402
from .kmeans import kmeans  # noqa: E402
from .mlcd import MlcdConfig, MlcdLoss, cluster_centers, mlcd_loss  # noqa: E402
from .multi_positive import MultiPositiveConfig, MultiPositiveLoss, multi_positive_loss  # noqa: E402
from .norton import NortonConfig, NortonLoss, norton_loss, sinkhorn_log  # noqa: E402
from .protoclip import ProtoClipConfig, ProtoClipLoss, protoclip_loss  # noqa: E402
from .tic import TicConfig, TicLoss, tic_loss  # noqa: E402

__all__ += ["AlipConfig", "AlipLoss", "alip_loss", "CaptionConfig", "CaptionLoss", "caption_loss",
            "DreamlipGroupingConfig", "DreamlipGroupingLoss", "dreamlip_grouping_loss", "kmeans", "MlcdConfig",
            "MlcdLoss", "cluster_centers", "mlcd_loss", "MultiPositiveConfig", "MultiPositiveLoss",
            "multi_positive_loss", "NortonConfig", "NortonLoss", "norton_loss", "sinkhorn_log", "ProtoClipConfig",
            "ProtoClipLoss", "protoclip_loss", "TicConfig", "TicLoss", "tic_loss"]
# --- end clustering, transport, multi-positive and captioning ---

# --- hard negatives and distillation ---
from .counting import CountingConfig, counting_loss  # noqa: E402
from .dclip import DclipConfig, cosine_distill_loss, dclip_loss  # noqa: E402
from .degla import ImageGroundedConfig, TextGroundedConfig, grounded_contrast  # noqa: E402
from .distill_kl import DistillKLConfig, distill_kl_loss  # noqa: E402
from .ema import EmaDistillConfig, EMATeacher, ema_distill_loss  # noqa: E402
from .hard_negative import HardNegativeConfig, hard_negative_loss  # noqa: E402
from .hqclip import HqClipConfig, hqclip_loss  # noqa: E402
from .hycd import HycdConfig, hycd_loss  # noqa: E402
from .rsm_distill import RsmDistillConfig, RsmDistillLoss, rsm_distill_loss  # noqa: E402
from .teacher_features import teacher_list  # noqa: E402

__all__ += ["CountingConfig", "counting_loss", "DclipConfig", "cosine_distill_loss", "dclip_loss",
            "ImageGroundedConfig", "TextGroundedConfig", "grounded_contrast", "DistillKLConfig", "distill_kl_loss",
            "EMATeacher", "EmaDistillConfig", "ema_distill_loss", "HardNegativeConfig", "hard_negative_loss",
            "HqClipConfig", "hqclip_loss", "HycdConfig", "hycd_loss", "teacher_list", "RsmDistillConfig",
            "RsmDistillLoss", "rsm_distill_loss"]
# --- end hard negatives and distillation ---

# --- model-variant terms ---
from .cloc import ClocConfig, ClocLoss, cloc_loss, generalized_iou  # noqa: E402  (CLOC, needs a region head)
from .long_clip import LongClipConfig, LongClipLoss, long_clip_loss, pca_reconstruct  # noqa: E402  (Long-CLIP)

__all__ += ["LongClipConfig", "LongClipLoss", "long_clip_loss", "pca_reconstruct", "ClocConfig", "ClocLoss",
            "cloc_loss", "generalized_iou"]
from .moe_balance import MoEBalanceLoss  # noqa: E402  (CLIP-MoE's balance loss, from the model's forward)

__all__ += ["MoEBalanceLoss"]
from .cosmo import CosmoGenerationConfig, CosmoGenerationLoss, cosmo_generation_loss  # noqa: E402  (COSMO)

__all__ += ["CosmoGenerationConfig", "CosmoGenerationLoss", "cosmo_generation_loss"]
# --- end model-variant terms ---

# --- region-level and compositional terms (issue 14) ---
from .fgclip_region import FgclipRegionConfig, FgclipRegionLoss, fgclip_region_loss, roi_region_features  # noqa: E402
from .ga_dms import GaDmsConfig, GaDmsLoss, dual_masks, ga_dms_loss, ga_scores  # noqa: E402
from .grain import GrainConfig, GrainLoss, grain_loss  # noqa: E402
from .sycoca import SycocaTgmimConfig, SycocaTgmimLoss, tgmim_loss  # noqa: E402

__all__ += ["FgclipRegionConfig", "FgclipRegionLoss", "fgclip_region_loss", "roi_region_features", "GaDmsConfig",
            "GaDmsLoss", "dual_masks", "ga_dms_loss", "ga_scores", "GrainConfig", "GrainLoss", "grain_loss",
            "SycocaTgmimConfig", "SycocaTgmimLoss", "tgmim_loss"]
# --- end region-level and compositional terms ---

# --- LVLM embedders (UniME) ---
from .unime_hardneg import (  # noqa: E402
    UnimeHardnegConfig,
    UnimeHardnegLoss,
    false_negative_mask,
    hard_negative_indices,
    unime_hardneg_loss,
)
from .unime_kd import UnimeKDConfig, UnimeKDLoss, unime_kd_loss  # noqa: E402

__all__ += ["UnimeHardnegConfig", "UnimeHardnegLoss", "false_negative_mask", "hard_negative_indices",
            "unime_hardneg_loss", "UnimeKDConfig", "UnimeKDLoss", "unime_kd_loss"]
# --- end LVLM embedders ---
