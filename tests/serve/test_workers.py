"""`clipforge serve --workers N`: N processes answer on one port, with the same results; a dead one is replaced."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from clipforge.cli.main import main
from clipforge.serve import Searcher
from clipforge.train.distributed import free_port


def _get(url: str, path: str, **params):
    import httpx

    return httpx.get(url + path, params=params, timeout=30)  # a new connection each time


def _wait_healthy(url: str, server: subprocess.Popen, seconds: float = 90) -> dict:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"clipforge serve exited: {server.stderr.read()[-2000:]}")
        try:
            r = _get(url, "/health")
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("clipforge serve --workers 2 did not answer /health in time")


def _processes(url: str, want: int, tries: int = 300) -> set[int]:
    seen = set()
    for _ in range(tries):
        r = _get(url, "/health")
        assert r.status_code == 200
        seen.add(r.json()["process"])
        if len(seen) >= want:
            break
    return seen


def test_two_worker_processes_give_the_same_answers_and_a_dead_one_is_replaced(model_dir, image_dir, tmp_path):
    pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(out), "--quiet"]) == 0
    expected = [(h.id, round(h.score, 5)) for h in Searcher(out, backend="numpy").text("a red circle", 4)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "clipforge.cli.main", "serve", str(out), "--port", str(port),
                               "--workers", "2", "--backend", "numpy", "--log-level", "warning"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(url, server)
        first = _processes(url, 2)
        assert len(first) == 2 and server.pid not in first  # two workers answer, not the supervisor
        for _ in range(6):  # whichever worker answers, the hits are the in-process searcher's
            hits = _get(url, "/search", q="a red circle", k=4).json()["results"]
            assert [(h["id"], round(h["score"], 5)) for h in hits] == expected
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        deadline, replaced = time.monotonic() + 90, set()
        while time.monotonic() < deadline and not replaced:
            r = _get(url, "/health")  # the surviving worker keeps answering meanwhile
            assert r.status_code == 200
            replaced = {r.json()["process"]} - first
            time.sleep(0.05)
        assert replaced, "the killed worker was not replaced within 90 s"
        assert victim not in _processes(url, 2)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert server.returncode == 0
