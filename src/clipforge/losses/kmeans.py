"""Lloyd's k-means on a feature matrix, deterministic (seeded), for the clustering-based terms.

ProtoCLIP clusters each modality of an episode of features into K prototypes (the paper runs
faiss k-means: Euclidean distance, centroids are plain means); MLCD clusters a dataset
offline into K centers. One Lloyd iteration assigns every point to its nearest centroid,
a(n) = argmin_k ||z_n - c_k||^2, then moves every centroid to the mean of its members,
c_k = mean{z_n : a(n) = k}; a centroid that loses all members keeps its position. The
start is K distinct points drawn with a seeded generator, so every process that holds the
same features computes the same clustering.
"""
from __future__ import annotations

import torch
from torch import Tensor


def nearest(points: Tensor, centroids: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Index of the nearest centroid (squared Euclidean distance) for each row of ``points``,
    among the ``allowed`` ones ([K] bool) when given."""
    distance = (points * points).sum(-1, keepdim=True) - 2 * points @ centroids.t() + (centroids * centroids).sum(-1)
    if allowed is not None:
        distance = distance.masked_fill(~allowed, float("inf"))
    return distance.argmin(dim=-1)


@torch.no_grad()
def kmeans(points: Tensor, k: int, iters: int = 20, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Cluster ``points`` [N, d] into ``k`` groups; returns (centroids [k, d], assignment [N])."""
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points; "
                         "lower the number of clusters or cluster more features")
    g = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(n, generator=g)[:k].to(points.device)].clone()
    for _ in range(iters):
        assign = nearest(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(points.dtype)
    return centroids, nearest(points, centroids)
