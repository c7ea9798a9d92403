"""benchmarks/profile_train_step.py: the FLOPs it reads from GEMM shapes, against hand counts and FlopCounterMode."""
from __future__ import annotations

import pytest
from benchhelpers import load_benchmark, tiny_clip_training_step
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode


def test_gemm_flops_of_each_operator_by_hand():
    prof = load_benchmark("profile_train_step.py")
    assert prof.gemm_flops("aten::mm", [[3, 4], [4, 5]]) == 2 * 3 * 4 * 5
    assert prof.gemm_flops("aten::addmm", [[5], [3, 4], [4, 5]]) == 2 * 3 * 4 * 5
    assert prof.gemm_flops("aten::bmm", [[2, 3, 4], [2, 4, 5]]) == 2 * 2 * 3 * 4 * 5
    assert prof.gemm_flops("aten::baddbmm", [[2, 3, 5], [2, 3, 4], [2, 4, 5]]) == 2 * 2 * 3 * 4 * 5
    with pytest.raises(ValueError, match="not a GEMM"):
        prof.gemm_flops("aten::add", [[3], [3]])


def test_the_gemms_of_a_training_step_hold_the_flops_flop_counter_counts():
    """The GEMM table's FLOPs of one forward + backward of a small CLIP equal what torch's own FlopCounterMode
    counts for the same step (which is also what bench_train_throughput's MFU divides by)."""
    prof = load_benchmark("profile_train_step.py")
    step = tiny_clip_training_step()

    with FlopCounterMode(display=False) as counter:
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        step()
    rows, total_us = prof.gemm_rows(p.events())
    assert sum(r[2] for r in rows.values()) == counter.get_total_flops() > 0
    assert sum(r[0] for r in rows.values()) > 0 and 0 < sum(r[1] for r in rows.values()) <= total_us
    lines = prof.gemm_table(rows, total_us, steps=1, peak=100.0)
    assert lines[0].startswith("| operator |") and len(lines) == len(rows) + 4
    assert f"{counter.get_total_flops() / 1e9:.2f} GFLOP" in lines[-1] and "% of 100" in lines[-1]
