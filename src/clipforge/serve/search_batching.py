"""Coalescing concurrent searches of one index into one backend call.

Exact search reads the whole embedding matrix for every call: 100,000 x 128 float32 is 51 MB, and a
single-query scan is bound by memory bandwidth, not arithmetic. A block of queries reads it once for
all of them (a matrix product). A server answering many clients at once makes many single-query calls:
text searches (already encoded in batches by the text batcher), image uploads and "more like this"
(docs/performance.md measures what sharing the calls does to latency under load).

:class:`SearchBatcher` puts every such call on one queue. One thread takes the oldest, adds whatever
else is waiting at that moment (up to ``max_rows`` query rows), and runs them as one backend call;
each caller gets its own rows back, with its own ``k``. Nothing waits for company: a query that finds
the queue empty is searched at once, and under load the queries that arrive while a search runs form
the next block. The ranking of every query is the one its own call would give (the block searches the
largest ``k`` of its queries and each is cut to its own), which ``tests/serve/test_search_batching.py``
checks against one call per query.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

SEARCH_BATCH = 64  # query rows searched in one backend call at most


class SearchBatcher:
    """Concurrent ``search(queries, ks)`` calls answered by as few ``run(queries, ks)`` calls as the load allows.

    ``run`` searches a block [n, dim] of normalized queries, query j with its own ``ks[j]``, and returns one list
    of hits per query (:meth:`clipforge.serve.search.Searcher.vectors` without batching). An error of a block is
    raised to each of its callers. ``stats``: calls answered, backend calls made and the largest block (rows).
    """

    def __init__(self, run: Callable[[np.ndarray, list[int]], list[list[Any]]], max_rows: int = SEARCH_BATCH):
        if max_rows < 1:
            raise ValueError(f"search batching needs max_rows >= 1, got {max_rows}")
        self._run, self.max_rows = run, int(max_rows)
        self._queue: queue.Queue = queue.Queue()
        self._start = threading.Lock()
        self._thread: threading.Thread | None = None
        self.stats = {"calls": 0, "searches": 0, "largest": 0}

    def search(self, queries: np.ndarray, ks: Sequence[int]) -> list[list[Any]]:
        """The hits of each row of ``queries`` (already checked and normalized), searched with other callers'."""
        with self._start:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="clipforge-search-batcher", daemon=True)
                self._thread.start()
        future: Future = Future()
        self._queue.put((queries, list(ks), future))
        return future.result()

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            rows = len(batch[0][1])
            while rows < self.max_rows:  # only what is already waiting: no query is held back for company
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
                rows += len(item[1])
            try:
                block = np.concatenate([q for q, _, _ in batch]) if len(batch) > 1 else batch[0][0]
                hits = self._run(block, [k for _, ks, _ in batch for k in ks])
                self.stats["calls"] += len(batch)
                self.stats["searches"] += 1
                self.stats["largest"] = max(self.stats["largest"], rows)
                start = 0
                for _, ks, future in batch:
                    future.set_result(hits[start:start + len(ks)])
                    start += len(ks)
            except Exception as e:  # noqa: BLE001 - handed to every caller of the block
                log.exception("search block of %d calls (%d queries) failed", len(batch), rows)
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(e)
