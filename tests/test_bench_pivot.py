"""benchmarks/bench_pivot.py's fidelity plug-in (recipe uclip): it refuses an unknown text side before any work, and
declares every metric the recipe judges."""
from __future__ import annotations

import pytest
import yaml
from benchhelpers import BENCHMARKS, load_benchmark


def test_an_unknown_text_side_is_refused_with_the_choices():
    bench = load_benchmark("bench_pivot.py")
    with pytest.raises(ValueError, match="text_side must be clip or pivot, got 'minilm'"):
        bench.pivot_arm(0, 1, 2, 4, text_side="minilm")
    raw = yaml.safe_load((BENCHMARKS / "fidelity" / "uclip.yaml").read_text())
    assert set(raw["metrics"]) == set(bench.pivot_arm.metrics)
