"""CLIPPINGS (clipforge.adapt.clippings) and the linkage metrics (clipforge.metrics), against references written
here: a naive double loop over the supervised contrastive loss (Khosla et al., eq. 2), a brute-force linkage,
and scikit-learn's pair confusion matrix and adjusted Rand index."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipforge.adapt.clippings import (
    FinetuneConfig,
    embed_records,
    finetune,
    link,
    link_clusters,
    link_nearest,
    pool,
    supcon_loss,
)


def naive_supcon(z, labels, tau):
    n = len(labels)
    total, anchors = 0.0, 0
    for i in range(n):
        pos = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(n) if a != i)
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denom) for p in pos) / len(pos)
        anchors += 1
    return total / anchors


def test_supcon_matches_the_papers_equation():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(10, 6, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 0])  # 2 and 4 have no positive: not anchors
    for tau in (0.07, 0.5):
        assert float(supcon_loss(z, labels, tau)) == pytest.approx(naive_supcon(z, labels.tolist(), tau), rel=1e-10)
    with pytest.raises(ValueError, match="share an entity"):
        supcon_loss(z[:3], torch.tensor([0, 1, 2]))


def test_pool_is_the_normalized_mean_of_unit_embeddings():
    v, t = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.5]])
    assert torch.allclose(pool(v, t), torch.tensor([[1.0, 1.0]]) / math.sqrt(2))


def brute_force_nn_components(z, threshold):
    n = z.shape[0]
    sims = z @ z.T
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for i in range(n):
        j = max((k for k in range(n) if k != i), key=lambda k: sims[i, k])
        if sims[i, j] >= threshold:
            parent[find(i)] = find(j)
    return [find(i) for i in range(n)]


def same_partition(a, b):
    return all((a[i] == a[j]) == (b[i] == b[j]) for i, j in itertools.combinations(range(len(a)), 2))


def test_nearest_neighbour_linkage_matches_a_brute_force_union_find():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(5, 8))
    z = torch.from_numpy(centers[rng.integers(0, 5, 30)] + 0.3 * rng.normal(size=(30, 8)))
    z = F.normalize(z, dim=-1)
    for thr in (0.5, 0.9, 0.99):
        comp, nn, score = link_nearest(z, thr)
        assert same_partition(comp.tolist(), brute_force_nn_components(z.numpy(), thr))
        sims = (z @ z.T).numpy()
        np.fill_diagonal(sims, -np.inf)
        np.testing.assert_array_equal(nn, sims.argmax(1))
        np.testing.assert_allclose(score, sims.max(1))


def test_cluster_linkage_matches_scikit_learn_average_agglomerative():
    from sklearn.cluster import AgglomerativeClustering

    rng = np.random.default_rng(2)
    centers = rng.normal(size=(4, 6))
    z = F.normalize(torch.from_numpy(centers[rng.integers(0, 4, 25)] + 0.2 * rng.normal(size=(25, 6))), dim=-1)
    ours = link_clusters(z, threshold=0.7)
    ref = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                  distance_threshold=0.3).fit_predict(z.numpy())
    assert same_partition(ours.tolist(), ref.tolist())
    assert len(set(ours.tolist())) > 1
    with pytest.raises(ValueError, match="method"):
        link(z, method="kmeans")


def test_finetuning_on_linked_records_lowers_the_loss(small_model):
    from clipforge.tokenizer import get_tokenizer

    model = small_model
    tok = get_tokenizer(model.context_length)
    g = torch.Generator().manual_seed(0)
    entities = 6
    base = torch.rand(entities, 3, 32, 32, generator=g)
    labels = [e for e in range(entities) for _ in range(4)]
    images = torch.stack([base[e] + 0.3 * torch.randn(3, 32, 32, generator=g) for e in labels])
    tokens = tok([f"record of entity {e} copy {k}" for e in range(entities) for k in range(4)])
    before = embed_records(model, images, tokens)
    loss_before = float(supcon_loss(before, torch.tensor(labels)))
    history = finetune(model, images, tokens, labels, FinetuneConfig(steps=30, lr=1e-3, batch_entities=6,
                                                                     per_entity=4))
    after = embed_records(model, images, tokens)
    assert float(supcon_loss(after, torch.tensor(labels))) < loss_before
    assert len(history) == 30
    with pytest.raises(ValueError, match="2 entities"):
        finetune(model, images[:2], tokens[:2], [0, 1], FinetuneConfig(steps=1))
