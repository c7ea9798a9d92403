"""MLCD: multi-label cluster discrimination (An et al., "Multi-label Cluster Discrimination for
Visual Representation Learning", ECCV 2024).

Offline, the training set's embeddings are clustered into K centers w_k (unit vectors;
:func:`cluster_centers` runs k-means for that). Each sample's labels are its l nearest
centers Omega_p (an image shows several concepts, so several clusters are positives); every
other center is a negative, Omega_n. With cosine scores s_k = f·w_k, scale gamma and margin m
on the positive scores, the loss keeps the positive and the negative classes in two separate
log-sum-exp terms, so that the positives do not compete with each other in one softmax and
the decision boundary sits at s = m for positives and s = 0 for negatives:

    L = log(1 + sum_{k in Omega_p} exp(-gamma (s_k - m))) + log(1 + sum_{k in Omega_n} exp(gamma s_k))

averaged over the batch. ``negative_ratio`` < 1 keeps a random fraction of the negative
classes per step (the paper's negative-class sampling for a million centers); the positives
of the batch are always kept.

Inputs: centers from the option ``centers`` (a buffer, checkpointed with the term) or
``extra["cluster_centers"]`` [K, d]; labels from ``extra["cluster_labels"]`` [B, l] (indices,
-1 = padding) or, when absent, the l centers nearest to each detached feature of the model
being trained (a simplification: the paper's labels come from the offline features).

The paper's set-up is the option ``clusters``: a file of ``clipforge data cluster``
(clipforge.train.clusters), computed once from a trained model's features of the training set.
Its centers become the (fixed) centers and the training program feeds each sample's labels, the
``num_labels`` centers nearest to its *stored* feature, as ``extra["cluster_labels"]``. The centers
stay fixed here (whether the paper's classifier weights are trained from them we could not check
from its abstract).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .kmeans import kmeans
from .registry import register
from .validate import parse_options


def cluster_centers(features: Tensor, num_centers: int, iters: int = 20, seed: int = 0) -> Tensor:
    """Offline clustering step: k-means on normalized features, centers back on the unit sphere."""
    centroids, _ = kmeans(F.normalize(features.detach().float(), dim=-1), num_centers, iters, seed)
    return F.normalize(centroids, dim=-1)


CLUSTERS_FORMAT = "clipforge-clusters-1"


def read_clusters(path: str | Path) -> dict[str, Any]:
    """A cluster file of ``clipforge data cluster`` ({"centers", "features", "model", "data", ...}), checked."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"mlcd clusters: no cluster file at {path}; compute one with "
                         "`clipforge data cluster RUN --k N --out FILE`")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a torn or foreign file)
        raise ValueError(f"mlcd clusters: {path} is not a cluster file ({type(e).__name__}: {e}); recompute it with "
                         "`clipforge data cluster`") from None
    if not isinstance(record, dict) or record.get("format") != CLUSTERS_FORMAT:
        raise ValueError(f"mlcd clusters: {path} is not a {CLUSTERS_FORMAT} file; recompute it with "
                         "`clipforge data cluster`")
    return record


def nearest_centers(features: Tensor, centers: Tensor, num_labels: int) -> Tensor:
    """The ``num_labels`` centers of highest cosine similarity to each (detached) feature: [B, l]."""
    if not 1 <= num_labels <= centers.shape[0]:
        raise ValueError(f"mlcd num_labels must be between 1 and the number of centers ({centers.shape[0]}), "
                         f"got {num_labels}")
    return (features.detach() @ centers.t()).topk(num_labels, dim=-1).indices


def _log1p_sum_exp(z: Tensor, keep: Tensor) -> Tensor:
    """log(1 + sum_k exp(z_k)) over the kept entries of each row, stable."""
    zero = torch.zeros(z.shape[0], 1, dtype=z.dtype, device=z.device)
    return torch.logsumexp(torch.cat([zero, z.masked_fill(~keep, float("-inf"))], dim=1), dim=1)


def mlcd_loss(features: Tensor, centers: Tensor, labels: Tensor, scale: float = 32.0, margin: float = 0.2,
              negative_ratio: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """The MLCD loss (module docstring) of normalized ``features`` [B, d] against ``centers`` [K, d]."""
    if features.ndim != 2 or centers.ndim != 2 or features.shape[1] != centers.shape[1]:
        raise ValueError(f"mlcd needs features [B, d] and centers [K, d], got {tuple(features.shape)} and "
                         f"{tuple(centers.shape)}")
    if labels.ndim != 2 or labels.shape[0] != features.shape[0] or labels.dtype.is_floating_point:
        raise ValueError(f"mlcd cluster labels must be integer indices [B, l] with B = {features.shape[0]}, "
                         f"got {tuple(labels.shape)} {labels.dtype}")
    k = centers.shape[0]
    if labels.numel() and (labels.max() >= k or labels.min() < -1):
        raise ValueError(f"mlcd cluster labels must lie in [0, {k}) (or -1 for padding)")
    if not 0 < negative_ratio <= 1:
        raise ValueError(f"mlcd negative_ratio must be in (0, 1], got {negative_ratio}")
    scores = features @ F.normalize(centers, dim=-1).t()  # [B, K] cosine
    pos = torch.zeros_like(scores, dtype=torch.bool)
    pos.scatter_(1, labels.clamp(min=0), labels >= 0)
    neg = ~pos
    if negative_ratio < 1:
        sampled = torch.rand(k, generator=generator, device="cpu").to(scores.device) < negative_ratio
        neg = neg & (sampled | pos.any(0))[None]  # the batch's positive classes stay in every row's negatives
    return (_log1p_sum_exp(-scale * (scores - margin), pos) + _log1p_sum_exp(scale * scores, neg)).mean()


@dataclass
class MlcdConfig:
    centers: Tensor | None = None  # [K, d], kept as a buffer (fixed); None: extra["cluster_centers"]
    num_labels: int = 3  # l: nearest centers that are positives
    scale: float = 32.0  # gamma
    margin: float = 0.2  # m, on the positive scores
    negative_ratio: float = 1.0  # fraction of the negative classes kept per step
    modality: str = "image"  # which features are classified: "image" or "text"
    # a cluster file of `clipforge data cluster`: its centers, and labels from its stored (offline) features
    clusters: str = ""

    def __post_init__(self):
        if self.modality not in ("image", "text"):
            raise ValueError(f"mlcd modality must be 'image' or 'text', got {self.modality!r}")
        if self.clusters and self.centers is not None:
            raise ValueError("mlcd takes its centers from the option centers or from a cluster file (clusters), "
                             "not both; drop one")


@register("mlcd")
class MlcdLoss(nn.Module):
    """Registered :func:`mlcd_loss` on the image (or text) features (options: :class:`MlcdConfig`)."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(MlcdConfig, options, "mlcd")
        centers = self.cfg.centers
        self.cluster_file = str(self.cfg.clusters) if self.cfg.clusters else None  # the data input reads its labels
        if self.cluster_file:
            centers = read_clusters(self.cluster_file)["centers"]
        centers = None if centers is None else F.normalize(torch.as_tensor(centers).float(), dim=-1)
        self.register_buffer("centers", centers)
        self.extra_keys = ("cluster_labels",) if self.cluster_file else ("cluster_centers",) if centers is None else ()

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        cfg = self.cfg
        feats = inputs.image_features if cfg.modality == "image" else inputs.text_features
        centers = self.centers if self.centers is not None else inputs.require("cluster_centers")
        centers = F.normalize(centers.to(feats.dtype), dim=-1)
        labels = inputs.require("cluster_labels") if self.cluster_file else inputs.extra.get("cluster_labels")
        if labels is None:
            labels = nearest_centers(feats, centers, cfg.num_labels)
        return {"loss": mlcd_loss(feats, centers, labels, cfg.scale, cfg.margin, cfg.negative_ratio)}
