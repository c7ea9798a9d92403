"""benchmarks/bench_moe.py, the plug-in of recipe clip_moe: the function-preserving FFN widening of its dense_wide
arm, the dense base shared by the arms of a seed, and each arm end to end at a toy budget."""
from __future__ import annotations

import pytest
import torch
from benchhelpers import load_benchmark

from clipforge.models import create_model
from clipforge.models.moe import upcycle


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    b = load_benchmark("bench_moe.py")
    b.CACHE = tmp_path_factory.mktemp("moe-cache")
    return b


def test_widened_ffns_compute_the_dense_models_function(bench):
    torch.manual_seed(0)
    dense = create_model("tiny", seed=0).double().eval()
    wide = bench.widen_ffn(dense, factor=2).double().eval()
    block, wide_block = dense.visual.transformer.blocks[0], wide.visual.transformer.blocks[0]
    assert wide_block.mlp[0].out_features == 2 * block.mlp[0].out_features
    # one FFN written out: W2' act(W1' x + b1') + b2 with the wide weights equals the dense FFN
    x = torch.randn(5, block.mlp[0].in_features, dtype=torch.float64)
    w1, b1, w2 = wide_block.mlp[0].weight, wide_block.mlp[0].bias, wide_block.mlp[2].weight
    naive = torch.nn.functional.gelu(x @ w1.T + b1) @ w2.T + wide_block.mlp[2].bias
    torch.testing.assert_close(naive, block.mlp(x))
    images = torch.randn(3, 3, dense.image_size, dense.image_size, dtype=torch.float64)
    ids = torch.randint(1, 400, (3, dense.context_length))
    ids[:, -1] = 49407  # end-of-text, where the text tower pools
    with torch.no_grad():
        torch.testing.assert_close(wide.encode_image(images), dense.encode_image(images))
        torch.testing.assert_close(wide.encode_text(ids), dense.encode_text(ids))
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in dense.parameters())


def test_widening_refuses_what_it_cannot_widen(bench):
    dense = create_model("tiny", seed=0)
    with pytest.raises(TypeError, match="plain CLIP"):
        bench.widen_ffn(upcycle(dense, 4, 2))
    with pytest.raises(ValueError, match="factor"):
        bench.widen_ffn(dense, factor=0)


def test_every_arm_of_a_seed_starts_from_one_cached_dense_model(bench, monkeypatch):
    first = bench.dense_base(0, 2, 8, 32, "fp32")

    def no_training(*args, **kwargs):
        raise AssertionError("the dense base was trained again instead of loaded from the cache")

    monkeypatch.setattr(bench, "train", no_training)
    assert bench.dense_base(0, 2, 8, 32, "fp32") == first
    cached = [p.name for p in bench.CACHE.iterdir()]
    assert len(cached) == 1 and not cached[0].endswith(".partial")


def test_each_arm_runs_and_reports_its_active_ffn_parameters(bench):
    out = {m: bench.moe_arm(0, 2, 8, 16, method=m, base_steps=2, stage_steps=1, clusters=2, train_size=32)
           for m in bench.METHODS}
    for method, metrics in out.items():
        assert set(metrics) == set(bench.moe_arm.metrics), method
        assert 0.0 <= metrics["object_top1"] <= 1.0 and metrics["extra_seconds"] > 0
    # a top-2 token of 4 dense-width experts passes through exactly twice the dense FFN parameters; the 2x-wide
    # dense FFN too, up to its output bias, which widening does not double
    assert out["dense_wide"]["active_ffn_params"] == pytest.approx(2 * out["dense"]["active_ffn_params"], rel=0.01)
    assert out["moe_copies"]["active_ffn_params"] == out["moe_dmu"]["active_ffn_params"] == 2 * out["dense"][
        "active_ffn_params"]
    assert out["moe_dmu"]["extra_ffn_steps"] == 3 and out["moe_copies"]["extra_ffn_steps"] == 0
    with pytest.raises(ValueError, match="dense, dense_wide, moe_copies, moe_dmu"):
        bench.moe_arm(0, 1, 2, 4, method="switch")
