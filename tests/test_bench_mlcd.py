"""benchmarks/bench_mlcd.py, the preparation step of the mlcd fidelity recipe: the cluster file comes from a
separately trained CLIP (its own run directory and seed), for exactly the arms' training data, and its centers are
k-means of that model's stored features (checked against a naive nearest-center assignment)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from benchhelpers import load_benchmark

SMALL = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
         "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}}


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_mlcd.py")


def test_offline_clusters_come_from_a_separate_model_of_the_same_data(bench, tmp_path):
    from clipforge import load
    from clipforge.train.clusters import weights_fingerprint

    path = bench.offline_clusters(tmp_path, k=4, teacher_steps=2, teacher_seed=7, batch=8, train_size=48, lr=1e-3,
                                  model_overrides=SMALL)
    record = torch.load(path, weights_only=True)
    teacher = tmp_path / "teacher"
    assert record["model"]["source"] == str(teacher)
    assert record["model"]["sha256"] == weights_fingerprint(load(str(teacher))[0])
    assert record["data"] == {"dataset": "shapes", "size": 48, "seed": 0, "root": None, "samples": 48}
    centers, features = record["centers"], record["features"]
    assert centers.shape == (4, 32) and features.shape == (48, 32)
    # each center is the normalized mean of the features nearest to it (a fixed point of the k-means it ran)
    nearest = (F.normalize(features, dim=-1) @ centers.t()).argmax(1)
    for c in nearest.unique().tolist():
        mean = F.normalize(F.normalize(features, dim=-1)[nearest == c].mean(0), dim=0)
        assert torch.allclose(mean, centers[c], atol=0.05)
