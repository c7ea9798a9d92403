"""benchmarks/bench_serve_load.py: the server's memory is summed over all its processes (``serve --workers N``)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from benchhelpers import load_benchmark

# a parent holding ~40 MB that starts two children holding ~40 MB each, then sleeps
TREE = """
import subprocess, sys, time
ballast = bytearray(40 << 20)
kids = [subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(40 << 20); print('up', flush=True); "
                          "time.sleep(60)"], stdout=subprocess.PIPE, text=True) for _ in range(2)]
for k in kids:
    k.stdout.readline()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture(scope="module")
def load():
    return load_benchmark("bench_serve_load.py")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_rss_counts_the_server_and_every_process_below_it(load):
    tree = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    pids = [tree.pid]
    try:
        assert tree.stdout.readline().strip() == "ready"
        pids = load._descendants(tree.pid)
        assert pids[0] == tree.pid and len(pids) == 3
        by_hand = 0.0
        for pid in pids:
            with open(f"/proc/{pid}/status") as f:
                by_hand += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
        got = load.rss_mb(tree.pid)
        assert got["VmRSS"] == pytest.approx(by_hand, rel=0.05) and got["VmRSS"] > 3 * 40
        assert got["VmHWM"] >= got["VmRSS"] - 1
    finally:
        for pid in reversed(pids):  # the children too: they would sleep on as orphans
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        tree.wait(10)
