"""benchmarks/bench_quality_per_minute.py: the wall-clock schedule both libraries train with."""
from __future__ import annotations

import math

import pytest
from benchhelpers import load_benchmark


@pytest.fixture(scope="module")
def qpm():
    return load_benchmark("bench_quality_per_minute.py")


def test_the_schedule_warms_up_by_steps_then_follows_the_clock_to_zero_at_the_budget(qpm):
    lr, warmup = qpm.LR, qpm.WARMUP
    assert qpm.lr_at(0, 0.0, None, 100.0) == pytest.approx(lr / warmup)
    assert qpm.lr_at(warmup - 1, 9.0, None, 100.0) == pytest.approx(lr)
    # warmup ended at 20 s of a 100 s budget: cosine over the 80 s left, by the clock, whatever the step count
    for step in (warmup, 10 * warmup):
        assert qpm.lr_at(step, 20.0, 20.0, 100.0) == pytest.approx(lr)
        assert qpm.lr_at(step, 60.0, 20.0, 100.0) == pytest.approx(lr / 2)
        assert qpm.lr_at(step, 40.0, 20.0, 100.0) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / 4)))
        assert qpm.lr_at(step, 100.0, 20.0, 100.0) == pytest.approx(0.0, abs=1e-12)
        assert qpm.lr_at(step, 130.0, 20.0, 100.0) == pytest.approx(0.0, abs=1e-12)  # a step that starts late
