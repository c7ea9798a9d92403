"""benchmarks/bench_adapt.py: the base model the adapter recipes (and comclip) share trains in the precision the
fidelity runner passes, one base per precision."""
from __future__ import annotations

import types

import pytest
from benchhelpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_adapt.py")


def test_the_base_model_trains_in_the_precision_it_is_given(bench, monkeypatch):
    import torch

    import clipforge.train

    configs = []

    class Model(torch.nn.Linear):
        context_length = 77

    def fake_train(cfg):
        configs.append(cfg)
        return types.SimpleNamespace(model=Model(1, 1))

    monkeypatch.setattr(clipforge.train, "train", fake_train)
    monkeypatch.setattr(bench, "_BASES", {})
    bench.base_model(0, 5, 4)
    bench.base_model(0, 5, 4, "fp32")
    bench.base_model(0, 5, 4, "fp32")  # kept in memory: not trained again
    assert [c.precision for c in configs] == [bench.BASE_PRECISION, "fp32"] and bench.BASE_PRECISION == "bf16"
    assert [(c.seed, c.steps, c.batch_size) for c in configs] == [(0, 5, 4)] * 2
