"""benchmarks/bench_speed_modes.py: the machine's CPU-time counters and one short run of its table."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from benchhelpers import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_speed_modes.py"


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux's /proc/stat")
def test_cpu_times_are_the_eight_counters_of_the_cpu_line_and_never_decrease():
    modes = load_benchmark("bench_speed_modes.py")
    first = modes.cpu_times()
    sum(i * i for i in range(200_000))  # some user time
    second = modes.cpu_times()
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    assert fields[0] == "cpu" and len(first) == len(second) == 8
    assert all(b >= a for a, b in zip(first, second))


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux's /proc/stat")
def test_prints_one_row_per_window_of_each_process():
    res = subprocess.run([sys.executable, str(SCRIPT), "--steps", "4", "--window", "2", "--processes", "2",
                          "--precision", "fp32", "--threads", "1", "--batch", "4"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1:3] for r in rows] == [[" 1 ", " 0-1 "], [" 1 ", " 2-3 "], [" 2 ", " 0-1 "], [" 2 ", " 2-3 "]]
    speeds = [float(r.split("|")[3]) for r in rows]
    assert all(s > 0 for s in speeds)


def test_a_window_longer_than_the_run_is_refused():
    res = subprocess.run([sys.executable, str(SCRIPT), "--steps", "4", "--window", "5"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "--window" in res.stderr
