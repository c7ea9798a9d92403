"""The page in a real headless browser: its JavaScript runs a search and renders the result grid.

Skipped without chromium (apt-get install chromium). The server is uvicorn on 127.0.0.1 in a
thread; the browser gets a bounded time budget and a hard timeout.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest

from clipforge.cli.main import main

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless chromium installed")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=15000", *args], capture_output=True, text=True, timeout=120)


def test_page_renders_results_in_browser(model_dir, image_dir, tmp_path):
    from servehelpers import LocalServer

    from clipforge.serve import Searcher
    from clipforge.serve.app import create_app

    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(out), "--quiet"]) == 0
    searcher = Searcher(out)
    expected = searcher.text("a red circle", 10)
    with LocalServer(create_app(searcher)) as base:
        dom = _chromium("--dump-dom", f"{base}/?q=a%20red%20circle").stdout
        assert dom.count('class="card"') == 10, dom[-2000:]
        # the grid shows the API's ranking, scores with three decimals
        shown = [s for s in dom.split('class="score"')[1:]]
        assert [s.split(">")[1].split("<")[0] for s in shown] == [f"{h.score:.3f}" for h in expected]
        assert "10 images" in dom  # the status line from /health
        png = tmp_path / "page.png"
        _chromium("--window-size=1100,800", f"--screenshot={png}", f"{base}/?q=a%20red%20circle")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
