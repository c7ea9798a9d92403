"""The machine's achieved GEMM FLOP/s in bf16 and fp32: the ceiling for training throughput.

Times ``F.linear`` (what ``nn.Linear`` calls; fp32 also as oneDNN's linear kernel) at the shapes a
training step of the ``tiny`` model actually runs (M = batch x tokens = 128 x 65 image tokens,
K/N = width 128 and MLP width 512), at a mid-size width (512 / 2048), and at large square
sizes where the GEMM kernels reach their best. A matmul of [M, K] x [K, N] is 2*M*K*N FLOPs.

    python benchmarks/bench_peak.py [--threads 2] [--repeats 5] [--shapes training|inference]

``--shapes inference`` times the linear layers of ViT-B-32 inference instead (width 768 / MLP 3072 for images at
batch 32 and 1, 50 tokens each; width 512 / MLP 2048 for a batch of 256 texts of about 18 tokens) and adds the
memory read rate of one pass over a 256 MB tensor and the rate at which the text tower's 48 linear layers read
their weights for a single short text (6 rows; ``F.linear`` and oneDNN's prepacked layer, what ``to_inference`` runs):
the ceilings ``bench_inference.py``'s rates are compared with in docs/performance.md.

``--shapes packed-rows`` times the prepacked oneDNN layers that ``to_inference`` runs (``FusedLinear``) for
ViT-B-32's text tower (qkv 512 -> 1536, MLP 512 -> 2048 with its GELU, 2048 -> 512) at growing row counts, up to
the 4,368 tokens of 256 captions packed into one matrix: how many rows a packed group can hold before a layer's
rate falls (``clipforge.models.packed_text.PACK_ROWS``).

Prints a markdown table with the median GFLOP/s (and min..max over repeats) per shape and
dtype. "Achieved peak" is the best single run of the table, whatever the shape (other jobs
on a shared machine only ever lower a run, so the best one is the closest to the ceiling) (on this CPU the
oneDNN bf16 kernels are at their best on tall-skinny shapes like the model's, not on the
large squares): a measured peak, not the vendor's theoretical one, and the denominator of
MFU in bench_train_throughput.py --peak.
"""
from __future__ import annotations

import argparse
import os
import time
from functools import partial

import torch
import torch.nn.functional as F

# (label, M, K, N): activations [M, K] times a weight [K, N]
SHAPES = [
    ("tiny qkv (8320x128 @ 128x384)", 128 * 65, 128, 384),
    ("tiny mlp fc1 (8320x128 @ 128x512)", 128 * 65, 128, 512),
    ("tiny mlp fc2 (8320x512 @ 512x128)", 128 * 65, 512, 128),
    ("mid mlp fc1 (2080x512 @ 512x2048)", 32 * 65, 512, 2048),
    ("mid mlp fc2 (2080x2048 @ 2048x512)", 32 * 65, 2048, 512),
    ("square 1024", 1024, 1024, 1024),
    ("square 2048", 2048, 2048, 2048),
    ("square 4096", 4096, 4096, 4096),
]

INFERENCE_SHAPES = [
    ("ViT-B-32 image qkv, batch 32 (1600x768 @ 768x2304)", 32 * 50, 768, 2304),
    ("ViT-B-32 image mlp fc1, batch 32 (1600x768 @ 768x3072)", 32 * 50, 768, 3072),
    ("ViT-B-32 image mlp fc2, batch 32 (1600x3072 @ 3072x768)", 32 * 50, 3072, 768),
    ("ViT-B-32 image mlp fc1, batch 1 (50x768 @ 768x3072)", 50, 768, 3072),
    ("ViT-B-32 text mlp fc1, 256 texts (4608x512 @ 512x2048)", 256 * 18, 512, 2048),
    ("ViT-B-32 text mlp fc2, 256 texts (4608x2048 @ 2048x512)", 256 * 18, 2048, 512),
]


PACKED_ROWS = (300, 600, 1100, 2200, 4368)
PACKED_LAYERS = [("text qkv", 512, 1536, "none"), ("text mlp fc1 + GELU", 512, 2048, "gelu"),
                 ("text mlp fc2", 2048, 512, "none")]


def packed_rows_flops_per_s(threads: int, repeats: int) -> list[dict]:
    """Per text-tower layer, dtype and row count (:data:`PACKED_ROWS`): the median (min..max) FLOP/s of
    ``FusedLinear`` over ``repeats`` bursts of calls lasting at least 0.2 s each."""
    from torch import nn

    from clipforge.models.fused_inference import FusedLinear

    torch.set_num_threads(threads)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for label, k, n, act in PACKED_LAYERS:
            layer = FusedLinear(nn.Linear(k, n).to(dtype), act)
            for m in PACKED_ROWS:
                x = torch.randn(m, k).to(dtype)
                with torch.no_grad():
                    for _ in range(2):  # the weight's reorder and the kernel's selection
                        layer(x)
                    runs = [2.0 * m * k * n * calls_per_s(partial(layer, x), 0.2) for _ in range(repeats)]
                rows.append({"layer": label, "dtype": str(dtype).split(".")[-1], "rows": m, **spread(runs)})
    return rows


def read_bytes_per_s(threads: int, repeats: int, megabytes: int = 256) -> list[float]:
    """Bytes per second of one ``sum`` over a float32 tensor of ``megabytes`` (far larger than the caches): the
    rate at which weights that do not fit in cache can be streamed, what bounds a batch-1 forward."""
    torch.set_num_threads(threads)
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    return _sorted_rates(x.sum, x.numel() * 4, repeats, warmup=1)


def _sorted_rates(run, nbytes: int, repeats: int, warmup: int) -> list[float]:
    """Bytes per second of ``repeats`` timed calls of ``run`` (each reading ``nbytes``) after ``warmup`` untimed
    ones, sorted."""
    for _ in range(warmup):
        run()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        runs.append(nbytes / (time.perf_counter() - t0))
    return sorted(runs)


def text_tower_weight_bytes_per_s(threads: int, repeats: int, rows: int = 6,
                                  dtype: torch.dtype = torch.bfloat16) -> dict[str, list[float]]:
    """Weight bytes per second of ViT-B-32's 12 text blocks (qkv, out, fc1, fc2: 48 distinct weights, 75.5 MB in
    bf16, 151 MB in fp32, more than the caches hold) applied one after the other to ``rows`` token rows, as one short
    text at batch 1 runs them: per kernel, the sorted rates of ``repeats`` passes. Such a pass does ~2 x rows FLOPs
    per weight it reads, so it is bound by how fast the kernel streams weights, not by arithmetic."""
    torch.set_num_threads(threads)
    shapes = [(1536, 512), (512, 512), (2048, 512), (512, 2048)] * 12  # (out, in) of each layer, in order
    weights = [torch.randn(o, i).to(dtype) for o, i in shapes]
    biases = [torch.randn(o).to(dtype) for o, _ in shapes]
    xs = [torch.randn(rows, i).to(dtype) for _, i in shapes]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    kernels = {"F.linear": lambda: [F.linear(x, w, b) for x, w, b in zip(xs, weights, biases)]}
    if torch.backends.mkldnn.is_available():
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
        kernels["oneDNN prepacked"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")
                                                for x, p, b in zip(xs, packed, biases)]
    return {name: _sorted_rates(run, nbytes, repeats, warmup=2) for name, run in kernels.items()}


def gemm_flops_per_s(m: int, k: int, n: int, dtype: torch.dtype, min_seconds: float = 0.3,
                     kernel: str = "torch") -> float:
    """Best-of-a-burst FLOP/s of F.linear(x [m,k], w [n,k]) (the nn.Linear call) for one timing run; ``kernel``
    "onednn": oneDNN's linear instead (what clipforge.models.onednn_linear trains fp32 with where it is faster)."""
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype)
    if kernel == "onednn":
        from clipforge.models.onednn_linear import onednn_linear_kernel as linear
    else:
        linear = F.linear
    for _ in range(3):  # warm the kernel selection / packing caches
        linear(x, w)
    return 2.0 * m * k * n * calls_per_s(lambda: linear(x, w), min_seconds)


def calls_per_s(call, min_seconds: float) -> float:
    """Calls per second of ``call`` over a burst of calls lasting at least ``min_seconds``."""
    iters, elapsed = 0, 0.0
    t0 = time.perf_counter()
    while elapsed < min_seconds:
        call()
        iters += 1
        elapsed = time.perf_counter() - t0
    return iters / elapsed


def spread(runs: list[float]) -> dict[str, float]:
    """{"median", "min", "max"} of the rates of repeated runs."""
    runs = sorted(runs)
    return {"median": runs[len(runs) // 2], "min": runs[0], "max": runs[-1]}


def measure(threads: int, repeats: int, shapes=SHAPES) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for label, m, k, n in shapes:
        # fp32 twice: torch's own GEMM (MKL) and oneDNN's linear, which is the faster one on some CPUs (twice as
        # fast on a Zen 5 EPYC); bf16 linears are oneDNN's already
        for dtype, kernel in ((torch.bfloat16, "torch"), (torch.float32, "torch"), (torch.float32, "onednn")):
            if kernel == "onednn" and not torch.backends.mkldnn.is_available():
                continue
            runs = [gemm_flops_per_s(m, k, n, dtype, kernel=kernel) for _ in range(repeats)]
            name = str(dtype).split(".")[-1]
            rows.append({"shape": label, "dtype": name, "kernel": kernel,
                         "label": name + (" (oneDNN)" if kernel == "onednn" else ""), **spread(runs)})
    return rows


def achieved_peak(threads: int = 2, repeats: int = 3) -> dict[str, float]:
    """{'bfloat16': FLOP/s, 'float32': FLOP/s}: the best run over all SHAPES and both fp32 kernels (load only
    lowers a run)."""
    rows = measure(threads, repeats)
    return {dt: max(r["max"] for r in rows if r["dtype"] == dt) for dt in ("bfloat16", "float32")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", choices=["training", "inference", "packed-rows"], default="training",
                    help="training: tiny's and a width-512 model's training GEMMs and large squares (default); "
                         "inference: ViT-B-32's inference linear layers, plus the memory read rate and the text "
                         "tower's weight-streaming rate for one short text; packed-rows: the text tower's "
                         "prepacked layers at 300 to 4,368 rows (packed text inference's group size)")
    args = ap.parse_args()
    if args.shapes == "packed-rows":
        print(f"\nthreads={args.threads} repeats={args.repeats} torch={torch.__version__}\n")
        print("| layer | dtype | rows | GFLOP/s median | min..max |")
        print("|---|---|---:|---:|---|")
        for r in packed_rows_flops_per_s(args.threads, args.repeats):
            print(f"| {r['layer']} | {r['dtype']} | {r['rows']} | {r['median'] / 1e9:.0f} | "
                  f"{r['min'] / 1e9:.0f}..{r['max'] / 1e9:.0f} |")
        return
    rows = measure(args.threads, args.repeats, SHAPES if args.shapes == "training" else INFERENCE_SHAPES)
    print(f"\nthreads={args.threads} repeats={args.repeats} torch={torch.__version__}\n")
    print("| GEMM | dtype | GFLOP/s median | min..max |")
    print("|---|---|---:|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['label']} | {r['median'] / 1e9:.0f} | {r['min'] / 1e9:.0f}..{r['max'] / 1e9:.0f} |")
    for dt in ("bfloat16", "float32"):
        best = max(r["max"] for r in rows if r["dtype"] == dt)
        print(f"achieved peak {dt}: {best / 1e9:.0f} GFLOP/s")
    torch_fp32 = max(r["max"] for r in rows if r["dtype"] == "float32" and r["kernel"] == "torch")
    print(f"  (float32 through torch's own GEMM, F.linear: {torch_fp32 / 1e9:.0f} GFLOP/s)")
    if args.shapes == "inference":
        reads = read_bytes_per_s(args.threads, args.repeats)
        print(f"memory read (sum over 256 MB of float32): median {reads[len(reads) // 2] / 1e9:.1f} GB/s "
              f"({reads[0] / 1e9:.1f}..{reads[-1] / 1e9:.1f})")
        from clipforge.train.device import cpu_has_fast_bf16

        # the dtype a text runs in here: bf16 where oneDNN has native bf16 kernels; on an AVX2-only CPU fp32 (bf16
        # is several times slower there, and oneDNN's prepacked bf16 layer refuses to run at all)
        dtype, label, mb = (torch.bfloat16, "bf16", 75.5) if cpu_has_fast_bf16() else (torch.float32, "fp32", 151.0)
        for name, runs in text_tower_weight_bytes_per_s(args.threads, max(args.repeats, 5), dtype=dtype).items():
            print(f"text tower weights, one 6-token text, {label}, {name}: median {runs[len(runs) // 2] / 1e9:.1f} "
                  f"GB/s ({runs[0] / 1e9:.1f}..{runs[-1] / 1e9:.1f}; {mb} MB per pass)")


if __name__ == "__main__":
    main()
