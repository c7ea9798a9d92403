"""Does this machine's training speed hold still? One process, many steps, the speed of each window of steps.

    python benchmarks/bench_speed_modes.py [--steps 250] [--window 25] [--precision bf16] [--threads 2]
        [--processes 2] [--model tiny] [--batch 128]

Trains the model of ``bench_train_throughput.py`` (same spec, images, ``shapes`` token batches, AdamW and loss) for
``--steps`` steps in each of ``--processes`` fresh processes, one after the other, and prints for every window of
``--window`` steps the samples/s of its median step beside how the machine's CPU time went in that window (user,
system, idle and steal shares from /proc/stat, all CPUs). Read it before trusting a comparison: on the 2-core
development VMs the speed of ``tiny`` bf16 moves between about 350 and 500 samples/s from one window of ~7 s to the
next, within one process as much as between processes, with the CPUs busy and no steal time showing (the host,
not the process, decides it); a side-by-side comparison there needs runs that alternate often, and its spread.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_times() -> list[int]:
    """The machine's CPU time so far by kind (user, nice, system, idle, iowait, irq, softirq, steal), in ticks."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def child(args) -> None:
    sys.path.insert(0, str(HERE.parent / "src"))
    sys.path.insert(0, str(HERE))
    from clipforge import allocator

    allocator.configure()  # what every clipforge command does
    import bench_train_throughput as btt
    import torch

    from clipforge.losses import clip_loss
    from clipforge.models import CLIP, CLIPConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = btt.model_spec(args.model)
    model = CLIP(CLIPConfig.from_dict({**spec, "compile": False})).train()
    opt = btt.clipforge_optimizer(model)
    images = btt.make_images(spec, args.batch)
    texts = btt.make_texts(spec, args.batch, "shapes", 8)
    before, times = cpu_times(), []
    for i in range(args.steps):
        t0 = time.perf_counter()
        btt.train_step(model, clip_loss, opt, images, texts[i % len(texts)], args.precision)
        times.append(time.perf_counter() - t0)
        if (i + 1) % args.window == 0:
            now = cpu_times()
            delta = [a - b for a, b in zip(now, before)]
            before, total = now, max(sum(delta), 1)
            w = sorted(times[-args.window:])
            print(json.dumps({"first": i + 1 - args.window, "last": i, "samples_per_s": args.batch / w[len(w) // 2],
                              "user": delta[0] / total, "system": delta[2] / total, "idle": delta[3] / total,
                              "steal": delta[7] / total}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=250, help="steps per process (default 250)")
    ap.add_argument("--window", type=int, default=25, help="steps per window (default 25)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--processes", type=int, default=2, help="fresh processes, one after the other (default 2)")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.window < 1 or args.steps < args.window:
        ap.error("--window must be at least 1 and at most --steps")
    if args._child:
        child(args)
        return
    print(f"model={args.model} batch={args.batch} precision={args.precision} threads={args.threads}, "
          f"{args.steps} steps per process in windows of {args.window}")
    print()
    print("| process | steps | samples/s (median step) | user | system | idle | steal |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    cmd = [sys.executable, __file__, "--_child", *sys.argv[1:]]
    for p in range(args.processes):
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:
                w = json.loads(line)
                print(f"| {p + 1} | {w['first']}-{w['last']} | {w['samples_per_s']:.1f} | {100 * w['user']:.1f}% | "
                      f"{100 * w['system']:.1f}% | {100 * w['idle']:.1f}% | {100 * w['steal']:.1f}% |", flush=True)
        if proc.returncode:
            sys.exit(f"process {p + 1} failed (exit {proc.returncode})")


if __name__ == "__main__":
    main()
