"""Data-parallel training throughput: 1 process x T threads vs N gloo processes x T/N threads.

Both sides train the ``tiny`` model (ViT 64 px / patch 8 / width 128 / 4 layers; text 32 tokens /
width 128 / 4 layers; embed 128) on ``shapes`` with the same global batch, AdamW and CLIP loss,
through ``clipforge.train.train``: the N-process side with ``distributed.nproc=N`` (the started
processes get ``T // N`` threads each). Each measurement runs in a fresh Python process, the
sides alternate, and each side is repeated ``--repeats`` times.

    python benchmarks/bench_distributed.py [--batch 128] [--steps 20] [--threads 2] [--nproc 2] [--repeats 2]
        [--precision fp32,bf16] [--fp32-linear torch,onednn]

A third row, one process with ``T/N`` threads, separates the scaling of the N processes from
what sharing the cores does to one multi-threaded process. Reported per side: the median over steps
(after the first 3) of the loop's per-step samples/s
(data loading, forward, backward, all-reduces, optimizer), the median over repeats; and the
wall time of the whole ``train()`` call (process start, imports, model build, final checkpoint).
``--fp32-linear torch,onednn`` runs every fp32 side once with torch's linear kernels and once inside
``clipforge.models.onednn_linear.onednn_fp32_linears`` (whose switch the started processes take), alternating.
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 3


def child(args) -> None:
    """One measurement, in this (fresh) process: prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from clipforge.models.onednn_linear import onednn_fp32_linears
    from clipforge.train import DataConfig, DistributedConfig, TrainConfig, train

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model="tiny", data=DataConfig(train_size=max(2048, args.batch * 4), eval_size=32),
                          batch_size=args.batch, steps=args.steps, warmup_steps=2, save_every=0, log_every=1,
                          out_dir=out, progress=False, precision=args.precision,
                          distributed=DistributedConfig(nproc=args.nproc))
        t0 = time.perf_counter()
        with onednn_fp32_linears(args.fp32_linear == "onednn"):
            result = train(cfg)
        wall = time.perf_counter() - t0
        per_step = [r["samples_per_second"] for r in map(json.loads, open(Path(out) / "metrics.jsonl")) if "loss" in r]
    print(json.dumps({"sps": statistics.median(per_step[WARMUP_STEPS:]), "wall": wall, "loss": result.losses[-1]}))


def measure(nproc: int, threads: int, args, kernels: str = "torch") -> dict:
    """A fresh process with ``threads`` threads; with ``nproc > 1`` it starts the training processes."""
    cmd = [sys.executable, __file__, "--child", "--nproc", str(nproc), "--threads", str(threads), "--batch",
           str(args.batch), "--steps", str(args.steps), "--precision", args.precision, "--fp32-linear", kernels]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="threads in total, split over the processes")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--fp32-linear", default="torch",
                   help="comma-separated fp32 linear kernels to compare: torch, onednn (default torch)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; "
          f"global batch {args.batch}, {args.steps} steps, median of steps {WARMUP_STEPS + 1}-{args.steps}, "
          f"{args.repeats} repeats")
    rows = []
    for precision in args.precision.split(","):
        args.precision = precision
        # (processes, threads each): the comparison, and one process with one process's share of the
        # threads, which tells scaling apart from what contention for the cores does to a multi-threaded process
        kernels = args.fp32_linear.split(",") if precision == "fp32" else ["torch"]
        share = args.threads // args.nproc
        sides = {(k, n, t): [] for k in kernels for n, t in ((1, args.threads), (args.nproc, share), (1, share))}
        for _ in range(args.repeats):
            for kernel, nproc, threads in sides:
                # the N-process side: a parent with all the threads, whose started processes split them
                sides[kernel, nproc, threads].append(measure(nproc, args.threads if nproc > 1 else threads, args,
                                                             kernel))
        base = statistics.median(r["sps"] for r in sides[kernels[0], 1, args.threads])
        for (kernel, nproc, threads), runs in sides.items():
            sps = statistics.median(r["sps"] for r in runs)
            wall = statistics.median(r["wall"] for r in runs)
            label = f"{precision}, {kernel} linears" if precision == "fp32" else precision
            rows.append(f"| {label} | {nproc} process{'es' if nproc > 1 else ''} x {threads} thread"
                        f"{'s' if threads > 1 else ''} | {sps:.1f} | {sps / base:.2f}x | {wall:.1f} | "
                        f"{', '.join(format(r['sps'], '.1f') for r in runs)} |")
    print(f"\n(load average {os.getloadavg()[0]:.1f} at the end)\n")
    print("| precision | setup | samples/s (step median) | vs the first row of its precision | train() wall s | "
          "samples/s per repeat |")
    print("|---|---|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
