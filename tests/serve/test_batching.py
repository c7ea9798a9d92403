"""Dynamic batching of text queries (issue 18 item 6): concurrent queries share a forward, each gets its own answer."""
from __future__ import annotations

import threading

import pytest

from clipforge.cli.main import main
from clipforge.serve import Searcher

QUERIES = ["a red circle", "two blue squares", "a green star", "three small triangles", "a yellow hexagon",
           "one big purple circle", "a star left of a square", "four shapes", "an orange triangle",
           "a blue star above a red circle", "two hexagons", "a small square"]


@pytest.fixture
def searcher(model_dir, image_dir, tmp_path):
    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(out), "--quiet"]) == 0
    return Searcher(out, backend="numpy")


def _together(n: int, fn):
    """Run ``fn(i)`` for i < n in n threads released at the same moment; results (or exceptions) by i."""
    barrier, out = threading.Barrier(n), [None] * n

    def run(i):
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - returned to the test
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_queries_share_forwards_and_each_gets_its_own_answer(searcher):
    from clipforge.serve.app import TextBatcher

    batcher = TextBatcher(searcher, max_batch=32, wait_ms=100)
    ks = [1 + i % 5 for i in range(len(QUERIES))]
    got = _together(len(QUERIES), lambda i: batcher.search(QUERIES[i], ks[i]))
    for q, k, hits in zip(QUERIES, ks, got):
        expected = searcher.text(q, k)  # sequential, one query per forward pass
        assert [h.id for h in hits] == [h.id for h in expected], q
        assert [h.score for h in hits] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert batcher.stats["queries"] == len(QUERIES)
    assert batcher.stats["forwards"] < len(QUERIES) and batcher.stats["largest"] > 1  # they were batched
    with pytest.raises(ValueError, match="empty"):
        batcher.search("  ", 3)


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_one_search_call_for_many_queries_equals_one_call_each(model_dir, image_dir, tmp_path, backend):
    """Searcher.vectors (the batcher's single backend call) against Searcher.vector per query, each with its own k."""
    if backend == "faiss":
        pytest.importorskip("faiss")
    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(out), "--quiet"]) == 0
    searcher = Searcher(out, backend=backend)
    emb = searcher.encode_text(QUERIES)
    ks = [1 + (3 * i) % 7 for i in range(len(QUERIES))]
    for hits, e, k in zip(searcher.vectors(emb * 3.0, ks), emb, ks):  # unnormalized input: normalized there too
        one = searcher.vector(e, k)
        assert [h.id for h in hits] == [h.id for h in one] and len(hits) == min(k, len(searcher))
        assert [h.score for h in hits] == pytest.approx([h.score for h in one], abs=1e-6)
    assert searcher.vectors(emb[:0], []) == []
    with pytest.raises(ValueError, match="values of k"):
        searcher.vectors(emb, [3])
    with pytest.raises(ValueError, match="dimension"):
        searcher.vectors(emb[:, :5], [3] * len(emb))


def test_an_error_in_a_batch_reaches_every_caller_and_the_batcher_goes_on(searcher, monkeypatch):
    from clipforge.serve.app import TextBatcher

    batcher = TextBatcher(searcher, wait_ms=100)
    real = searcher.encode_text
    monkeypatch.setattr(searcher, "encode_text", lambda texts: (_ for _ in ()).throw(RuntimeError("boom")))
    got = _together(4, lambda i: batcher.search(QUERIES[i], 3))
    assert all(isinstance(g, RuntimeError) and "boom" in str(g) for g in got)
    monkeypatch.setattr(searcher, "encode_text", real)
    assert [h.id for h in batcher.search(QUERIES[0], 3)] == [h.id for h in searcher.text(QUERIES[0], 3)]


def test_server_batches_concurrent_text_searches(searcher):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from servehelpers import LocalServer

    from clipforge.serve.app import create_app

    with LocalServer(create_app(searcher, text_batch=16, text_batch_wait_ms=100)) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            got = _together(10, lambda i: client.get("/search", params={"q": QUERIES[i], "k": 4}).json())
            health = client.get("/health").json()
    for q, body in zip(QUERIES, got):
        assert [r["id"] for r in body["results"]] == [h.id for h in searcher.text(q, 4)], q
    stats = health["text_batching"]
    assert stats["queries"] == 10 and stats["forwards"] < 10
