"""`clipforge serve` keeps idle connections open longer than clients keep them in their pools (--keep-alive).

With uvicorn's default of 5 s the server closed idle connections at the same moment httpx's pool (keepalive_expiry,
5 s) still handed them out, and a request sent on a connection the server was closing failed with a ReadError (once
in 12,000 requests of bench_serve_load.py, docs/performance.md). The reference for "longer than clients" is httpx's
own default, read from httpx.
"""
from __future__ import annotations

import pytest

from clipforge.cli import serve as serve_cli
from clipforge.cli.main import main


@pytest.fixture
def uvicorn_calls(monkeypatch):
    pytest.importorskip("uvicorn")
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(serve_cli, "freeze_loaded_objects", lambda: None)  # not this test's concern
    monkeypatch.delenv(serve_cli.WORKER_SETTINGS, raising=False)  # --workers sets it: gone again after the test
    return calls


def test_the_server_outlasts_the_idle_expiry_of_httpx_pools(searcher, uvicorn_calls):
    httpx = pytest.importorskip("httpx")
    assert main(["serve", str(searcher.root), "--backend", "numpy", "--port", "0"]) == 0
    (kwargs,) = uvicorn_calls
    assert kwargs["timeout_keep_alive"] == serve_cli.KEEP_ALIVE_SECONDS
    assert kwargs["timeout_keep_alive"] > httpx.Limits().keepalive_expiry


def test_keep_alive_reaches_every_worker_process_and_must_be_positive(searcher, uvicorn_calls, capsys):
    assert main(["serve", str(searcher.root), "--backend", "numpy", "--port", "0", "--keep-alive", "20",
                 "--workers", "2"]) == 0
    assert uvicorn_calls[-1]["timeout_keep_alive"] == 20 and uvicorn_calls[-1]["workers"] == 2
    assert main(["serve", str(searcher.root), "--backend", "numpy", "--keep-alive", "0"]) != 0
    assert "--keep-alive must be positive, got 0" in capsys.readouterr().err
