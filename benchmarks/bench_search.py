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

``--ann N``: search over millions instead. N synthetic vectors of ``--dim`` (512) stored float16
in a memory-mapped ``embeddings.npy``, clustered like CLIP image embeddings: every vector is
``0.6 * m + c_j + e`` normalized, with ``m`` one direction shared by all (CLIP embeddings of
unrelated images have cosines around 0.5), ``c_j`` one of N/100 cluster centres drawn with a
decaying spectrum (variance of dimension i proportional to 1/(1 + i/32), in a random rotation)
and ``e`` isotropic noise. Per index type (``--types``; ``flat`` is faiss ``IndexFlatIP``):
build time (training + adding; ``tune s`` separately: exact search of 200 tuning queries and the
recall sweep), index memory (faiss's serialized size, and its ratio to the float32 vectors
``4 N d``), recall@10 of 200 other queries against exact numpy search, p50/p99 latency of one
query at a time (batch 1, the backend's ``search`` as ``clipforge serve`` calls it, ivfpq's
re-ranking included).

    nice python benchmarks/bench_search.py --ann 1000000 --max-memory 512MB --types ivfpq ivf

``--vectors FILE.npy``: the same measurements over given vectors (``real_text_vectors.py`` writes a real
encoder's embeddings of real sentences), the last ``--queries`` rows held out as the queries.

    python benchmarks/bench_search.py --vectors /tmp/changelog-minilm.npy --max-memory 64MB --types flat ivf ivfpq hnsw
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


def clip_like(path: Path, n: int, d: int, seed: int = 0) -> np.ndarray:
    """N x d float16 unit vectors clustered like CLIP embeddings (see the module docstring), memory-mapped."""
    rng = np.random.default_rng(seed)
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scale = (1.0 / np.sqrt(1 + np.arange(d) / 32)).astype(np.float32)
    shared = rng.standard_normal(d).astype(np.float32)
    shared /= np.linalg.norm(shared)
    k = max(n // 100, 1)
    centres = ((rng.standard_normal((k, d)) * scale) @ rot).astype(np.float32)
    centres *= 0.8 / np.sqrt(np.mean(np.sum(centres ** 2, axis=1)))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    for s in range(0, n, 50_000):
        m = min(50_000, n - s)
        x = 0.6 * shared + centres[rng.integers(0, k, m)] + rng.standard_normal((m, d)).astype(np.float32) * (
            0.5 / np.sqrt(d))
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def real_vectors(path: Path, source: Path, queries: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the ``.npy`` at ``source`` (e.g. from real_text_vectors.py), L2-normalized: its last ``queries``
    rows as the queries (not in the collection), the others (at most ``limit``) written to ``path`` as the float16
    memory-mapped collection."""
    src = np.load(source, mmap_mode="r")
    if src.ndim != 2 or len(src) <= queries:
        raise SystemExit(f"--vectors {source}: need a 2-d array with more than {queries} rows, got shape {src.shape}")
    n = len(src) - queries if not limit else min(limit, len(src) - queries)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, src.shape[1]))
    for s in range(0, n, 50_000):
        block = np.asarray(src[s:min(s + 50_000, n)], dtype=np.float32)
        out[s:s + len(block)] = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    out.flush()
    del out
    q = np.asarray(src[len(src) - queries:], dtype=np.float32)
    return np.load(path, mmap_mode="r"), q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)


def run_ann(args) -> None:
    import faiss

    from clipforge.serve import ann
    from clipforge.serve.search import AnnBackend, FaissBackend

    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        if args.vectors:
            x, q = real_vectors(Path(tmp) / "embeddings.npy", args.vectors, args.queries, args.ann)
            what = f"the rows of {args.vectors.name}, the last {args.queries} held out as queries"
        else:
            x = clip_like(Path(tmp) / "embeddings.npy", args.ann, args.dim)
            q = ann.tuning_queries(x, args.queries, seed=99)  # other queries than the build-time tuning's (seed 1)
            what = "clustered (CLIP-like)"
        n, d = x.shape
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__} "
              f"threads {faiss.omp_get_max_threads()}; N={n:,} d={d} float16 memory-mapped, {what}; "
              f"k=10, {args.queries} timed queries at batch 1; load average {os.getloadavg()[0]:.1f} at start",
              flush=True)
        print(f"  prepared in {time.perf_counter() - t0:.0f} s; auto would choose: "
              f"{ann.choose_index(n, d, args.max_memory).reason}", flush=True)
        t0 = time.perf_counter()
        truth = ann.exact_topk(x, q, args.k)
        print(f"  exact reference for {len(q)} queries in {time.perf_counter() - t0:.0f} s", flush=True)
        float32_bytes = 4 * n * d
        for kind in args.types:
            t0 = time.perf_counter()
            if kind == "flat":
                backend = FaissBackend(x)
                build_s, tune_s, mem, param = time.perf_counter() - t0, 0.0, backend.index.ntotal * d * 4, "exact"
            else:
                spec = ann.choose_index(n, d, args.max_memory if kind == "ivfpq" else None, kind)
                index = ann.build(x, spec)
                build_s = time.perf_counter() - t0
                record = {"spec": spec.to_dict(), "count": n}
                t1 = time.perf_counter()
                tuning = ann.tune(index, kind, x, AnnBackend(index, x, record).search)
                tune_s = time.perf_counter() - t1
                record["search"] = {tuning.param: tuning.value}
                backend = AnnBackend(index, x, record)
                mem = len(faiss.serialize_index(index))
                param = f"{spec.factory()} {tuning.param}={tuning.value}"
            for i in range(10):  # warm-up
                backend.search(q[i:i + 1], args.k)
            times, found = [], []
            for i in range(len(q)):
                t1 = time.perf_counter()
                _, ids = backend.search(q[i:i + 1], args.k)
                times.append(time.perf_counter() - t1)
                found.append(ids[0])
            recall = ann.recall_at(np.asarray(found), truth)
            rows.append([kind, param, f"{build_s:.1f}", f"{tune_s:.1f}", f"{mem / 2**20:,.0f}",
                         f"{100 * mem / float32_bytes:.1f}%", f"{recall:.3f}", f"{percentile_ms(times, 50):.2f}",
                         f"{percentile_ms(times, 99):.2f}"])
            print("  done", rows[-1], f"load {os.getloadavg()[0]:.1f}", flush=True)
            del backend
    print_table(["type", "index (search parameter)", "build s", "tune s", "memory MiB", "of float32",
                 "recall@10", "p50 ms", "p99 ms"], rows, left=2)


def print_table(header: list[str], rows: list[list[str]], left: int = 2) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if j >= left else c.ljust(w)
                                 for j, (c, w) in enumerate(zip(cells, widths))) + " |"

    print()
    print(line(header))
    print("|" + "|".join("-" * (w + 1) + (":" if j >= left else "-") for j, w in enumerate(widths)) + "|")
    for r in rows:
        print(line(r))


def percentile_ms(times: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(times) * 1000, q))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000], help="index sizes N")
    p.add_argument("--queries", type=int, default=200, help="timed queries per configuration")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="queries per batch for the batched throughput")
    p.add_argument("--model", help="a trained model (default: tiny with random weights)")
    p.add_argument("--ann", type=int, metavar="N", help="search over millions: N synthetic vectors, per index type")
    p.add_argument("--dim", type=int, default=512, help="--ann: dimension (default 512)")
    p.add_argument("--vectors", type=Path, metavar="FILE.npy",
                   help="search over these vectors instead of synthetic ones (real_text_vectors.py writes real "
                        "ones): the last --queries rows are the queries, the rest (at most --ann N) the collection")
    p.add_argument("--types", nargs="+", default=["flat", "ivf", "ivfpq", "hnsw"],
                   choices=["flat", "ivf", "ivfpq", "hnsw"], help="--ann: index types to measure")
    p.add_argument("--max-memory", default="512MB", help="--ann: the ivfpq budget (default 512MB, 25%% of 1M x 512 "
                                                           "float32)")
    p.add_argument("--tmp", default=None, help="--ann: where the embeddings file goes (default the system's)")
    args = p.parse_args()
    if args.ann or args.vectors:
        run_ann(args)
        return

    if args.model:
        model, tok, pre = clipforge.load(args.model)
    else:
        model = clipforge.create_model("tiny", seed=0).eval()
        tok, pre = clipforge.get_tokenizer(model.context_length), clipforge.image_transform(model.image_size)
    texts = [
        s for i in range(args.queries + args.batch + 20) for s in ShapesGenerator("val", seed=1).sample(i).captions[:1]
    ]
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
    line = lambda cells: (
        "| " + " | ".join(c.rjust(w) if j > 1 else c.ljust(w) for j, (c, w) in enumerate(zip(cells, widths))) + " |"
    )
    print()
    print(line(header))
    print("|" + "|".join("-" * (w + 1) + (":" if j > 1 else "-") for j, w in enumerate(widths)) + "|")
    for r in rows:
        print(line(r))


if __name__ == "__main__":
    main()
