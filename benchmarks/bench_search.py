"""Search latency and throughput of the text -> image path: tokenize + encode the query + search the index.

For each index size N, an index of N random unit vectors (stored float16, as ``clipforge
index`` does) is written to a temporary directory and queried through the real
:class:`clipforge.serve.Searcher` (``Searcher.text``: tokenizer, text tower, backend,
result rows), with the faiss and the numpy backend. Both backends are checked to return the
same ids before anything is timed.

Reported per (N, backend), after warm-up, over ``--queries`` different captions one at a time:

- ``search p50``: the backend's search alone (the query embedding precomputed), median ms
- ``text->image p50 / p95``: the whole ``Searcher.text`` call, ms
- ``q/s``: sequential queries per second of the whole call (1 / mean latency)
- ``batched q/s``: ``--batch`` queries tokenized, encoded and searched together

The text tower is ``tiny``'s (random weights: latency does not depend on what was learned);
``--model`` takes a trained one instead.

    OMP_NUM_THREADS=1 python benchmarks/bench_search.py [--sizes 10000 30000 100000] [--queries 200]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import clipforge
from clipforge.data.shapes import ShapesGenerator
from clipforge.serve import Searcher, faiss_available
from clipforge.serve.index import COLUMNS, FORMAT, _write, model_info


def write_random_index(root: Path, model, n: int, seed: int = 0) -> None:
    """An index of ``n`` random unit vectors with placeholder metadata, owned by ``model``."""
    rng = np.random.default_rng(seed)
    d = model.cfg.embed_dim
    emb = np.empty((n, d), np.float16)
    for s in range(0, n, 20_000):  # chunks keep the float32 intermediate small
        x = rng.standard_normal((min(20_000, n - s), d)).astype(np.float32)
        emb[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    meta = {c: [] for c in COLUMNS}
    for i in range(n):
        for c, v in (("key", f"random/{i}"), ("kind", "file"), ("path", f"/nonexistent/{i}.png"), ("offset", -1),
                     ("length", 0), ("mtime_ns", 0), ("ext", "png"), ("caption", None)):
            meta[c].append(v)
    info = model_info(model, None)
    _write(root, {"format": FORMAT, "model": info, "dim": d, "dtype": "float16", "normalized": True,
                  "sources": [{"kind": "random", "n": n}]}, emb, meta)


def percentile_ms(times: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(times) * 1000, q))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000], help="index sizes N")
    p.add_argument("--queries", type=int, default=200, help="timed queries per configuration")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="queries per batch for the batched throughput")
    p.add_argument("--model", help="a trained model (default: tiny with random weights)")
    args = p.parse_args()

    if args.model:
        model, tok, pre = clipforge.load(args.model)
    else:
        model = clipforge.create_model("tiny", seed=0).eval()
        tok, pre = clipforge.get_tokenizer(model.context_length), clipforge.image_transform(model.image_size)
    texts = [s for i in range(args.queries + args.batch + 20) for s in ShapesGenerator("val", seed=1).sample(i).captions[:1]]
    warm, timed_q, batch = texts[:20], texts[20:20 + args.queries], texts[20 + args.queries:]
    backends = ["faiss", "numpy"] if faiss_available() else ["numpy"]
    threads = f"torch threads {torch.get_num_threads()}"
    if faiss_available():
        import faiss

        threads += f", faiss threads {faiss.omp_get_max_threads()}"
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; model dim {model.cfg.embed_dim}, "
          f"k={args.k}, {args.queries} queries")
    if not faiss_available():
        print("# faiss-cpu is not installed: numpy only (pip install faiss-cpu)")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            root = Path(tmp) / f"n{n}"
            write_random_index(root, model, n)
            searchers = {b: Searcher(root, model=(model, tok, pre), backend=b) for b in backends}
            # correctness first: every backend returns the reference (numpy) ranking
            ref = searchers["numpy"]
            for t in timed_q[:20]:
                ids = [h.id for h in ref.text(t, args.k)]
                for b, s in searchers.items():
                    got = [h.id for h in s.text(t, args.k)]
                    assert got == ids, f"{b} differs from numpy at N={n} for {t!r}: {got} vs {ids}"
            qvec = ref.encode_text(timed_q)
            for s in searchers.values():
                for t in warm:
                    s.text(t, args.k)
            # interleaved: each query is timed on every backend in turn, so a busy moment of the machine
            # lands on both instead of on whichever ran second
            search_t = {b: [] for b in searchers}
            total_t = {b: [] for b in searchers}
            for j, (t, v) in enumerate(zip(timed_q, qvec)):
                order = list(searchers) if j % 2 == 0 else list(reversed(searchers))
                for b in order:
                    s = searchers[b]
                    t0 = time.perf_counter()
                    s.backend.search(v[None], args.k)
                    t1 = time.perf_counter()
                    s.text(t, args.k)
                    t2 = time.perf_counter()
                    search_t[b].append(t1 - t0)
                    total_t[b].append(t2 - t1)
            for b, s in searchers.items():
                t0 = time.perf_counter()
                reps = 3
                for _ in range(reps):
                    s.backend.search(s.encode_text(batch), args.k)
                batched = reps * len(batch) / (time.perf_counter() - t0)
                rows.append([f"{n:,}", b, f"{percentile_ms(search_t[b], 50):.2f}",
                             f"{percentile_ms(total_t[b], 50):.2f}", f"{percentile_ms(total_t[b], 95):.2f}",
                             f"{1 / np.mean(total_t[b]):.0f}", f"{batched:.0f}"])
                print("  done", rows[-1], flush=True)
            del searchers

    header = ["N", "backend", "search p50 ms", "text->image p50 ms", "p95 ms", "q/s", f"batched q/s ({args.batch})"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) if j > 1 else c.ljust(w) for j, (c, w) in enumerate(zip(cells, widths))) + " |"
    print()
    print(line(header))
    print("|" + "|".join("-" * (w + 1) + (":" if j > 1 else "-") for j, w in enumerate(widths)) + "|")
    for r in rows:
        print(line(r))


if __name__ == "__main__":
    main()
