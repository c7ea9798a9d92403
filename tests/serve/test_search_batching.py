"""Coalescing concurrent searches (clipforge.serve.search_batching, issue 18 item 6): the searches of concurrent
requests of every kind share backend calls, and each caller gets exactly what its own call would give."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from test_batching import QUERIES, _together

from clipforge.cli.main import main
from clipforge.serve import Searcher


@pytest.fixture(params=["numpy", "faiss"])
def searcher(model_dir, image_dir, tmp_path, request):
    if request.param == "faiss":
        pytest.importorskip("faiss")
    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(out), "--quiet"]) == 0
    return Searcher(out, backend=request.param)


def _slow_backend(searcher, monkeypatch, seconds=0.05):
    """Count the backend's calls and the rows of each; each call takes ``seconds`` so that others queue up."""
    real, calls = searcher.backend.search, []

    def search(queries, k):
        calls.append(len(queries))
        time.sleep(seconds)
        return real(queries, k)

    monkeypatch.setattr(searcher.backend, "search", search)
    return calls


def _ids(hits):
    return [(h.id, round(h.score, 5)) for h in hits]


def test_concurrent_searches_of_every_kind_share_backend_calls_and_get_their_own_results(searcher, monkeypatch,
                                                                                          image_dir):
    images = sorted(p for p in image_dir.rglob("*") if p.suffix in (".png", ".jpg", ".webp"))[:4]
    assert images
    n = len(searcher)
    # 12 requests of three kinds, each with its own k: what each gives searched on its own, batching off
    work = [("text", QUERIES[i], 1 + i % 5) for i in range(6)] + \
           [("similar", i % n, 2 + i % 3) for i in range(3)] + [("image", str(images[i % len(images)]), 3)
                                                                 for i in range(3)]

    def one(kind, what, k):
        return {"text": searcher.text, "similar": searcher.similar, "image": searcher.image}[kind](what, k)

    expected = [_ids(one(*w)) for w in work]
    calls = _slow_backend(searcher, monkeypatch)
    batcher = searcher.batch_searches(max_rows=64)
    got = _together(len(work), lambda i: one(*work[i]))
    assert [_ids(g) for g in got] == expected
    assert batcher.stats["calls"] == len(work) == sum(calls)  # every query searched once, in fewer calls
    assert len(calls) < len(work) and max(calls) > 1 and batcher.stats["largest"] == max(calls)


def test_a_block_holds_at_most_max_rows_queries_and_a_lone_query_does_not_wait(searcher, monkeypatch):
    emb = searcher.encode_text(QUERIES)
    expected = [_ids(searcher.vector(e, 4)) for e in emb]
    calls = _slow_backend(searcher, monkeypatch)
    searcher.batch_searches(max_rows=3)
    got = _together(len(QUERIES), lambda i: searcher.vector(emb[i], 4))
    assert [_ids(g) for g in got] == expected and max(calls) <= 3 and sum(calls) == len(QUERIES)
    t0 = time.perf_counter()
    searcher.vector(emb[0], 4)  # nothing else waiting: searched at once, not held back for company
    assert calls[-1] == 1 and time.perf_counter() - t0 < 5.0
    # a caller's own block of rows (the text batcher's) travels whole, with the others waiting
    many = searcher.vectors(emb, [1 + i % 4 for i in range(len(emb))])
    assert [_ids(h) for h in many] == [_ids(searcher.vector(e, 1 + i % 4)) for i, e in enumerate(emb)]


def test_an_error_reaches_every_caller_of_its_block_and_searching_goes_on(searcher, monkeypatch):
    emb = searcher.encode_text(QUERIES[:6])
    expected = [_ids(searcher.vector(e, 3)) for e in emb]
    real, gate = searcher.backend.search, threading.Event()

    def failing(queries, k):
        gate.wait(5)  # the first call holds the others back, so they fail together in the next block
        raise RuntimeError("backend broke")

    monkeypatch.setattr(searcher.backend, "search", failing)
    searcher.batch_searches()
    threading.Timer(0.3, gate.set).start()
    got = _together(6, lambda i: searcher.vector(emb[i], 3))
    assert all(isinstance(g, RuntimeError) and "backend broke" in str(g) for g in got)
    monkeypatch.setattr(searcher.backend, "search", real)
    assert [_ids(searcher.vector(e, 3)) for e in emb] == expected  # the batcher thread survived
    with pytest.raises(ValueError, match="dimension"):  # bad input is refused in the caller, never queued
        searcher.vector(np.ones(5, np.float32), 3)


def test_the_server_batches_searches_and_reports_it(searcher):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from servehelpers import LocalServer

    from clipforge.serve.app import create_app

    with pytest.raises(ValueError, match="search_batch must be >= 1"):
        create_app(searcher, search_batch=0)
    n = len(searcher)
    expected = [[h.id for h in searcher.similar(i % n, 3)] for i in range(8)]
    with LocalServer(create_app(searcher, search_batch=16)) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            got = _together(8, lambda i: client.get(f"/search/similar/{i % n}", params={"k": 3}).json())
            health = client.get("/health").json()
    assert [[r["id"] for r in body["results"]] for body in got] == expected
    assert health["search_batching"]["calls"] == 8 and health["search_batching"]["max_rows"] == 16
    off = create_app(searcher, search_batch=1)
    assert off is not None and searcher.batcher is None


def test_serve_refuses_a_search_batch_below_one(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--search-batch", "0"]) != 0
    assert "--search-batch must be positive" in capsys.readouterr().err
