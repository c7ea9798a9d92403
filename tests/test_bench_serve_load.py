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


SPIN = """
import subprocess, sys, time
kid = subprocess.Popen([sys.executable, "-c", "import time\\nt = time.process_time()\\n"
                        "while time.process_time() - t < 0.6: pass\\nprint('spun', flush=True)\\ntime.sleep(60)"],
                       stdout=subprocess.PIPE, text=True)
kid.stdout.readline()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_cpu_seconds_count_the_server_and_every_process_below_it(load, monkeypatch):
    """A sleeping parent whose child burned 0.6 s of CPU: the tree's CPU time includes the child's, and for this
    process alone /proc agrees with getrusage (os.times)."""
    import time

    tree = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
    pids = [tree.pid]
    try:
        assert tree.stdout.readline().strip() == "ready"
        pids = load._descendants(tree.pid)
        assert len(pids) == 2
        # the child's spin plus two interpreters' start-up; /proc counts whole clock ticks, utime and stime each
        # rounded down (0.59 s was read once for a spin that process_time measured as 0.6 s)
        tick = 1 / os.sysconf("SC_CLK_TCK")
        assert 0.6 - 2 * tick <= load.cpu_seconds(tree.pid) < 0.6 + 1.5
    finally:
        for pid in reversed(pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        tree.wait(10)
    # this process alone (other tests may have left processes below it): /proc's utime + stime against getrusage's
    monkeypatch.setattr(load, "_descendants", lambda pid: [pid])
    t = time.process_time()
    while time.process_time() - t < 0.3:
        pass
    mine = os.times()
    assert load.cpu_seconds(os.getpid()) == pytest.approx(mine.user + mine.system, abs=0.05)


def test_a_padded_index_gets_the_approximate_index_it_asks_for(load, tmp_path):
    """pad_index(ann="hnsw") stores an HNSW index over every padded row: the Searcher serves it, and its top 10
    agree with exact top 10 computed here with numpy over the padded embeddings."""
    pytest.importorskip("faiss")
    import numpy as np
    from PIL import Image

    import clipforge
    from clipforge.cli.main import main
    from clipforge.data.shapes import ShapesGenerator
    from clipforge.models import save_model
    from clipforge.serve.search import Searcher

    small = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
             "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}}
    model_dir = save_model(clipforge.create_model("tiny", seed=0, **small), tmp_path / "model")
    gen = ShapesGenerator("val", seed=0, image_size=48)
    (tmp_path / "images").mkdir()
    for i in range(12):
        Image.fromarray(gen.sample(i).image).save(tmp_path / "images" / f"{i}.png")
    index = tmp_path / "index"
    assert main(["index", str(model_dir), "--images", str(tmp_path / "images"), "--out", str(index), "--quiet"]) == 0

    load.pad_index(index, 3000, seed=0, ann="hnsw")
    searcher = Searcher(index)
    assert len(searcher) == 3000 and searcher.backend.name == "faiss-hnsw" and searcher.backend.covered == 3000
    vectors = np.load(index / "embeddings.npy")
    rng = np.random.default_rng(5)
    queries = vectors[rng.choice(3000, 50, replace=False)] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    found = [[h.id for h in hits] for hits in searcher.vectors(queries, [10] * 50)]
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    assert recall >= 0.9, recall


def test_ann_without_padding_is_refused(load, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_serve_load.py", "--ann", "hnsw", "--index", "somewhere"])
    with pytest.raises(SystemExit, match="--pad-to"):
        load.main()


def test_the_trace_has_one_row_per_request_with_its_start_latency_and_server_time(load, tmp_path):
    """--trace: run_level against a stand-in server (JSON answers carrying took_ms), then the CSV it writes."""
    import asyncio
    import csv
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"took_ms": 1.5, "results": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        results, seconds = asyncio.run(load.run_level(base, 3, 12, 30, 5, [], ["a red circle"], seed=0,
                                                      mix={"text": 1, "similar": 1}))
    finally:
        server.shutdown()
    rows = load.trace_rows(3, results)
    load.write_trace(tmp_path / "trace.csv", rows)
    with open(tmp_path / "trace.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == 12 and list(read[0]) == load.TRACE_COLUMNS
    starts = [float(r["start_s"]) for r in read]
    assert starts == sorted(starts) and 0 <= starts[0] and starts[-1] < seconds
    assert all(r["clients"] == "3" and r["status"] == "200" and r["server_ms"] == "1.5" for r in read)
    assert all(0 < float(r["latency_ms"]) < seconds * 1000 for r in read)
    assert {r["kind"] for r in read} <= {"text", "similar"}
