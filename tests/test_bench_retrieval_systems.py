"""benchmarks/bench_retrieval_systems.py: the cached base CoCa is trained once, and a failed training blocks nothing."""
from __future__ import annotations

import json

import pytest
from benchhelpers import load_benchmark


@pytest.fixture
def bench(tmp_path, monkeypatch):
    mod = load_benchmark("bench_retrieval_systems.py")
    monkeypatch.setattr(mod, "CACHE", tmp_path / "cache")
    calls = []

    def fake_train(cfg):  # stands in for clipforge.train.train: writes the checkpoint marker a real run writes
        calls.append(cfg.out_dir)
        ckpt = tmp_path / "cache" / cfg.out_dir.split("/")[-1] / "checkpoints"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "latest.json").write_text(json.dumps({"step": cfg.steps}))

    import clipforge.train

    monkeypatch.setattr(clipforge.train, "train", fake_train)
    return mod, calls


def test_a_directory_left_by_a_failed_training_is_trained_again_not_waited_on(bench, tmp_path):
    mod, calls = bench
    left = tmp_path / "cache" / "coca-emoji-s0-n40-b32"
    (left / "checkpoints").mkdir(parents=True)  # what a training that died before its checkpoint leaves
    (left / "stale.txt").write_text("x")
    out = mod.base_model_dir("emoji", 0, 40, 32)
    assert out == left and calls == [str(left)]
    assert (out / "checkpoints" / "latest.json").exists() and not (out / "stale.txt").exists()
    assert mod.base_model_dir("emoji", 0, 40, 32) == out and len(calls) == 1  # cached: not trained again


def test_a_base_being_trained_by_a_live_process_is_waited_for(bench, tmp_path, monkeypatch):
    mod, calls = bench
    import clipforge.locking as locking

    real = locking.exclusive_lock
    with real(tmp_path / "cache" / ".locks" / "coca-emoji-s1-n40-b32", "held by the test"):
        # the hour-long wait shortened to 0.3 s: the holder is alive, so the call waits, then reports it
        monkeypatch.setattr(locking, "exclusive_lock", lambda d, what, timeout=0.0: real(d, what, timeout=0.3))
        with pytest.raises(locking.LockHeld):
            mod.base_model_dir("emoji", 1, 40, 32)
    assert calls == []
