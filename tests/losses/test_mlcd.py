"""MLCD (multi-label cluster discrimination) against a naive loop over samples and classes."""
import math

import pytest
import torch
from reference.naive_losses import dot, unit

from clipforge import losses
from clipforge.losses import LossInputs, cluster_centers, mlcd_loss
from clipforge.losses.mlcd import nearest_centers

F64 = torch.float64



def naive_mlcd(x, centers, labels, scale, margin, negatives=None):
    """log(1 + sum_pos exp(-gamma (s - m))) + log(1 + sum_neg exp(gamma s)), per sample, averaged."""
    total = 0.0
    for i in range(len(x)):
        pos = {int(k) for k in labels[i] if int(k) >= 0}
        s = [dot(x[i], centers[k] / centers[k].norm()) for k in range(len(centers))]
        pos_sum = sum(torch.exp(-scale * (s[k] - margin)) for k in pos)
        neg_sum = sum(torch.exp(scale * s[k]) for k in range(len(centers))
                      if k not in pos and (negatives is None or negatives[k]))
        total = total + torch.log(1 + pos_sum) + torch.log(1 + neg_sum)
    return total / len(x)


def test_matches_naive():
    x, centers = unit(4, 3, 0), unit(6, 3, 1) * 2.0  # centers need not arrive normalized
    labels = torch.tensor([[0, 2], [1, -1], [5, 3], [4, 0]])  # -1 pads a sample with fewer labels
    assert torch.allclose(mlcd_loss(x, centers, labels, 4.0, 0.2), naive_mlcd(x, centers, labels, 4.0, 0.2))
    # negative-class sampling: a random subset of classes, the batch's positive classes always kept
    g = torch.Generator().manual_seed(3)
    fast = mlcd_loss(x, centers, labels, 4.0, 0.2, negative_ratio=0.4, generator=g)
    sampled = torch.rand(6, generator=torch.Generator().manual_seed(3)) < 0.4
    positives = set(labels[labels >= 0].tolist())
    keep = [bool(sampled[k]) or k in positives for k in range(6)]
    assert torch.allclose(fast, naive_mlcd(x, centers, labels, 4.0, 0.2, keep))


def test_gradcheck():
    x, centers = unit(3, 3, 2).requires_grad_(), unit(5, 3, 3).requires_grad_()
    labels = torch.tensor([[0, 1], [2, 4], [3, -1]])
    assert torch.autograd.gradcheck(lambda a, c: mlcd_loss(a, c, labels, 3.0, 0.3), (x, centers))


def test_properties():
    # hand value: a feature on its only positive center, orthogonal to the K - 1 others
    centers = torch.eye(4, dtype=F64)
    x = centers[:1].clone()
    expect = math.log(1 + math.exp(-8.0 * (1 - 0.25))) + math.log(1 + 3 * math.exp(0.0))
    assert math.isclose(float(mlcd_loss(x, centers, torch.tensor([[0]]), 8.0, 0.25)), expect, rel_tol=1e-12)
    # relabeling the classes (permuting the centers and the labels alike) and permuting the batch change nothing
    x, c = unit(5, 3, 4), unit(7, 3, 5)
    labels = nearest_centers(x, c, 2)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    inv = torch.argsort(perm)
    base = mlcd_loss(x, c, labels, 10.0, 0.1)
    assert torch.allclose(mlcd_loss(x, c[perm], inv[labels], 10.0, 0.1), base)
    order = torch.tensor([4, 2, 0, 1, 3])
    assert torch.allclose(mlcd_loss(x[order], c, labels[order], 10.0, 0.1), base)
    # positives do not compete: two positives both at cosine 1 and negatives at -1 drive the loss to 0
    # as the scale grows (a softmax over the classes would stay >= log 2 with two targets)
    x2 = torch.tensor([[1.0, 0.0]], dtype=F64)
    c2 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    assert float(mlcd_loss(x2, c2, torch.tensor([[0, 1]]), 64.0, 0.2)) < 1e-20


def test_module_centers_helper_and_errors():
    feats = unit(40, 3, 6)
    centers = cluster_centers(feats, 5, seed=1)
    assert centers.shape == (5, 3) and torch.allclose(centers.norm(dim=-1), torch.ones(5, dtype=torch.float32))
    x, y = unit(4, 3, 7), unit(4, 3, 8)
    term = losses.build("mlcd", centers=centers, num_labels=2, scale=5.0, margin=0.1)
    assert "centers" in term.state_dict() and term.extra_keys == ()
    assert losses.build("mlcd").extra_keys == ("cluster_centers",)  # the training program must supply them
    expect = mlcd_loss(x, centers.double(), nearest_centers(x, centers.double(), 2), 5.0, 0.1)
    assert torch.allclose(term(LossInputs(x, y, torch.tensor(1.0)))["loss"], expect)
    # centers from the batch instead of a buffer, explicit labels, text modality
    extra = {"cluster_centers": centers.double(), "cluster_labels": torch.tensor([[0], [1], [2], [3]])}
    li = LossInputs(x, y, torch.tensor(1.0), extra=extra)
    out = losses.build("mlcd", modality="text", scale=5.0, margin=0.1)(li)["loss"]
    assert torch.allclose(out, mlcd_loss(y, centers.double(), li.extra["cluster_labels"], 5.0, 0.1))
    with pytest.raises(KeyError, match="cluster_centers"):
        losses.build("mlcd")(LossInputs(x, y, torch.tensor(1.0)))
    with pytest.raises(ValueError, match=r"lie in \[0, 5\)"):
        mlcd_loss(x, centers.double(), torch.tensor([[7], [0], [0], [0]]))
    with pytest.raises(ValueError, match="num_labels"):
        nearest_centers(x, centers.double(), 9)
    with pytest.raises(ValueError, match="modality"):
        losses.build("mlcd", modality="audio")


def test_clusters_option_takes_the_stored_centers_and_requires_the_labels(tmp_path):
    centers = torch.nn.functional.normalize(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    path = tmp_path / "c.pt"
    torch.save({"format": "clipforge-clusters-1", "centers": centers, "features": torch.randn(7, 3)}, path)
    term = losses.build("mlcd", clusters=str(path), num_labels=2, scale=5.0, margin=0.1)
    assert term.extra_keys == ("cluster_labels",) and torch.allclose(term.centers, centers, atol=1e-6)
    x, y = unit(4, 3, 7), unit(4, 3, 8)
    labels = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 2]])  # given, not the model's own nearest centers
    li = LossInputs(x, y, torch.tensor(1.0), extra={"cluster_labels": labels})
    assert torch.allclose(term(li)["loss"], mlcd_loss(x, centers.double(), labels, 5.0, 0.1))
    with pytest.raises(KeyError, match="cluster_labels"):
        term(LossInputs(x, y, torch.tensor(1.0)))
    with pytest.raises(ValueError, match="no cluster file"):
        losses.build("mlcd", clusters=str(tmp_path / "none.pt"))
    torch.save({"centers": centers}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a clipforge-clusters-1 file"):
        losses.build("mlcd", clusters=str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="not both"):
        losses.build("mlcd", clusters=str(path), centers=centers)
