"""Where IVF-PQ loses recall: the IVF lists, ``nprobe`` and the re-ranking shortlist, swept over given vectors.

``clipforge index`` picks ``ivfpq`` when only product-quantized codes fit the memory budget; the backend
(:class:`clipforge.serve.search.AnnBackend`) asks faiss for a shortlist of ``max(shortlist, 4k)`` candidates and
re-scores them exactly from the stored vectors. Recall@k can be lost in two places: the true neighbours sit in lists
that were not probed (``nprobe``, the number of lists), or they were probed but their quantized scores left them out
of the shortlist. This script separates the two on real vectors (``real_text_vectors.py`` writes them): for each
``--nlists`` it builds the index once (``clipforge.serve.ann.build``, the product quantizer the ``--max-memory``
budget allows, as ``auto`` picks it), then per ``--nprobes`` value it reports recall@k of the held-out queries (the
last ``--queries`` rows, not indexed) for every ``--shortlists`` value, the recall of the tuning's own queries
(stored rows plus noise, ``ann.tuning_queries``), the IVF-Flat bound at that ``nprobe`` (every probed vector scored
exactly: what an unlimited shortlist would reach) and p50 latency of one query at a time. The shortlists are timed
alternating query by query, so load changes hit them alike.

    python benchmarks/bench_search_shortlist.py --vectors /tmp/changelog-minilm-all.npy --max-memory 318MB \\
        --nlists 1024 4096 --nprobes 32 64 128 256 --shortlists 100 200 400
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # bench_search's real_vectors, also when this file is loaded by a test
    sys.path.insert(0, str(HERE))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vectors", type=Path, required=True, help="an N x d .npy (e.g. from real_text_vectors.py)")
    ap.add_argument("--queries", type=int, default=200, help="the last rows, held out as queries (default 200)")
    ap.add_argument("--max-memory", default="318MB", help="the budget that sets the PQ code size (default 318MB)")
    ap.add_argument("--nlists", type=int, nargs="+", default=[1024], help="IVF lists to build (default 1024)")
    ap.add_argument("--nprobes", type=int, nargs="+", default=[32, 64, 128], help="lists probed (default 32 64 128)")
    ap.add_argument("--shortlists", type=int, nargs="+", default=[100, 200, 400],
                    help="least candidates re-scored exactly (default 100 200 400)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--tmp", default=None, help="where the normalized float16 copy of the vectors goes")
    args = ap.parse_args(argv)

    import faiss
    from bench_search import real_vectors

    from clipforge.serve import ann
    from clipforge.serve.search import AnnBackend

    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        x, q = real_vectors(Path(tmp) / "embeddings.npy", args.vectors, args.queries)
        n, d = x.shape
        auto = ann.choose_index(n, d, args.max_memory, kind="ivfpq")
        truth = ann.exact_topk(x, q, args.k)
        tq = ann.tuning_queries(x)
        tuning_truth = ann.exact_topk(x, tq, args.k)
        print(f"# {platform.machine()}, faiss {faiss.__version__} threads {faiss.omp_get_max_threads()}; N={n:,} "
              f"d={d}, {len(q)} held-out queries, k={args.k}; PQ{auto.m}x8 (the largest code in "
              f"--max-memory {args.max_memory})", flush=True)
        for nlist in args.nlists:
            spec = ann.AnnSpec("ivfpq", n, d, nlist=nlist, m=auto.m,
                               memory=ann.estimate_memory("ivfpq", n, d, nlist, auto.m))
            t0 = time.perf_counter()
            index = ann.build(x, spec)
            built = time.perf_counter() - t0
            # the bound: the same lists (the same trained coarse quantizer), every probed vector scored exactly
            flat = faiss.IndexIVFFlat(faiss.extract_index_ivf(index).quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            ann.add(flat, x, 0)
            record = {"spec": spec.to_dict(), "count": n}
            print(f"  {spec.factory()} built in {built:.1f} s", flush=True)
            for nprobe in [p for p in args.nprobes if p <= nlist]:
                backends = [AnnBackend(index, x, record, nprobe=nprobe, shortlist=s) for s in args.shortlists]
                bound = AnnBackend(flat, x, {"spec": {"kind": "ivf"}, "count": n}, nprobe=nprobe)
                found = [[] for _ in backends]
                times = [[] for _ in backends]
                for r in range(len(q)):
                    order = np.roll(np.arange(len(backends)), r)  # alternate which shortlist goes first
                    for j in order:
                        t = time.perf_counter()
                        found[j].append(backends[j].search(q[r:r + 1], args.k)[1][0])
                        times[j].append(time.perf_counter() - t)
                flat_recall = ann.recall_at(bound.search(q, args.k)[1], truth)
                for j, s in enumerate(args.shortlists):
                    row = {"lists": nlist, "nprobe": nprobe, "shortlist": s, "build_s": built,
                           "recall": ann.recall_at(np.array(found[j]), truth),
                           "tuning_recall": ann.recall_at(backends[j].search(tq, args.k)[1], tuning_truth),
                           "flat_recall": flat_recall, "p50_ms": 1e3 * float(np.median(times[j]))}
                    rows.append(row)
                    print(f"    nprobe {nprobe} shortlist {s}: recall {row['recall']:.3f} (tuning queries "
                          f"{row['tuning_recall']:.3f}, IVF-Flat {flat_recall:.3f}) p50 {row['p50_ms']:.2f} ms",
                          flush=True)
    print()
    print("| lists | build s | nprobe | shortlist | recall@k held out | recall@k tuning queries | IVF-Flat bound "
          "| p50 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['lists']} | {r['build_s']:.1f} | {r['nprobe']} | {r['shortlist']} | {r['recall']:.3f} | "
              f"{r['tuning_recall']:.3f} | {r['flat_recall']:.3f} | {r['p50_ms']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
