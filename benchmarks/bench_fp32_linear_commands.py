"""``clipforge eval``, ``index`` and ``adapt`` in fp32 with ``--fp32-linear torch`` against ``--fp32-linear onednn``:
wall-clock seconds of whole commands, side by side, alternating.

    nice python benchmarks/bench_fp32_linear_commands.py [--model ViT-B-32] [--repeats 3] [--threads 2]

The model is a randomly initialized ``--model`` saved once into a temporary directory (the time of a command
does not depend on what the weights learned); the commands run in this process through ``clipforge.cli.main``,
as the command line runs them, caches off:

- ``eval``: ``clipforge eval MODEL --tasks zero_shot,retrieval --size N --no-cache --no-report`` on the built-in
  shapes data (N images and their captions encoded, 5 class prompts per template);
- ``index``: ``clipforge index MODEL --images DIR --rebuild --dtype float32`` over ``--images`` shapes renders;
- ``adapt``: ``clipforge adapt MODEL --method coop --shots 4 --coop-epochs E`` (CoOp: forward and backward
  passes through the frozen text tower, then the test split encoded).

Every command first runs once with each choice, untimed (imports and first-call costs). Within each repeat every
command runs with both choices, the one that goes first alternating from repeat to
repeat. Printed: each run's seconds, then per command the median seconds of each choice with its range and the
median of the per-repeat ratios (torch / onednn: above 1, oneDNN is faster) with their range, and the load
average before and after. ``onednn_is_faster()`` (what ``--fp32-linear auto`` asks) is printed too.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from pathlib import Path


def render_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    from clipforge.data.shapes import ShapesGenerator

    folder.mkdir(parents=True, exist_ok=True)
    gen = ShapesGenerator("val", seed=0, image_size=size)
    for i in range(n):
        Image.fromarray(gen.sample(i).image).save(folder / f"{i:05d}.png")


def commands(model: Path, images: Path, work: Path, args) -> dict[str, list[str]]:
    return {
        "eval": ["eval", str(model), "--tasks", "zero_shot,retrieval", "--size", str(args.eval_size), "--no-cache",
                 "--no-report", "--json", "--quiet", "--out", str(work / "eval")],
        "index": ["index", str(model), "--images", str(images), "--out", str(work / "index"), "--rebuild",
                  "--dtype", "float32", "--quiet"],
        "adapt": ["adapt", str(model), "--method", "coop", "--shots", "4", "--size", str(args.adapt_size),
                  "--coop-epochs", str(args.coop_epochs), "--quiet", "--json"],
    }


def run_once(argv: list[str], choice: str) -> float:
    from clipforge.cli.main import main

    sink = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        rc = main([*argv, "--fp32-linear", choice])
    seconds = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"clipforge {' '.join(argv)} --fp32-linear {choice} failed (rc {rc}):\n{sink.getvalue()}")
    return seconds


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help="architecture, randomly initialized (default ViT-B-32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every CPU)")
    ap.add_argument("--images", type=int, default=128, help="images the index embeds (default 128)")
    ap.add_argument("--eval-size", type=int, default=200, help="eval's --size (default 200)")
    ap.add_argument("--adapt-size", type=int, default=60, help="adapt's --size (default 60)")
    ap.add_argument("--coop-epochs", type=int, default=2, help="adapt's --coop-epochs (default 2)")
    ap.add_argument("--only", nargs="+", choices=("eval", "index", "adapt"), help="a subset of the commands")
    args = ap.parse_args()

    import torch

    import clipforge
    from clipforge.models import save_model
    from clipforge.models.onednn_linear import onednn_is_faster

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="clipforge-bench-fp32-linear-"))
    model = save_model(clipforge.create_model(args.model, seed=0), work / "model")
    render_images(work / "images", args.images, clipforge.create_model(args.model).image_size)
    todo = commands(model, work / "images", work, args)
    names = args.only or list(todo)
    print(f"model {args.model} (random weights), {args.threads} torch threads, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}; onednn_is_faster() = {onednn_is_faster()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for name in names:  # untimed: first-call costs (imports, rendering the suite's data, kernel set-up)
        for choice in ("torch", "onednn"):
            run_once(todo[name], choice)
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.repeats):
        order = ("torch", "onednn") if r % 2 == 0 else ("onednn", "torch")
        for name in names:
            for choice in order:
                s = run_once(todo[name], choice)
                times.setdefault((name, choice), []).append(s)
                print(f"repeat {r + 1} {name:5s} {choice:6s} {s:7.2f} s", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}\n")
    print("| command | torch s | onednn s | torch / onednn |")
    print("|---|---:|---:|---:|")
    for name in names:
        t, o = times[(name, "torch")], times[(name, "onednn")]
        ratios = [a / b for a, b in zip(t, o)]
        print(f"| {name} | {spread(t)} | {spread(o)} | {spread(ratios, '{:.2f}')}x |")


if __name__ == "__main__":
    main()
