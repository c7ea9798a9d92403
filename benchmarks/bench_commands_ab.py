"""Whole ``clipforge`` commands from two source trees, alternating: wall time, peak RSS and training rate.

    python benchmarks/bench_commands_ab.py --baseline-src /path/to/other/checkout/src [--repeats 5] \
        [--commands train-2 eval index] [--model tiny] [--images 128] [--long-steps 300 [--long-precision fp32]
        [--long-overrides distributed.nproc=2 ...]]

Each repeat runs every command once with this checkout's ``src`` and once with ``--baseline-src`` (the order
alternates from one repeat to the next), each as a fresh ``python -m clipforge.cli.main`` process:

- ``train-2``: ``clipforge train --no-eval model=tiny steps=2 batch_size=32``: mostly start-up (imports, the
  model, the shapes data, one checkpoint);
- ``eval``: ``clipforge eval`` of a random ``--model`` on the quick suite at ``--size 64`` (no report, no cache);
- ``index``: ``clipforge index`` of a random ``--model`` over ``--images`` shapes renders (256 px), float32, into a
  new index each time;
- ``train-N`` (with ``--long-steps N``): ``clipforge train --no-eval model=tiny steps=N batch_size=128
  precision=bf16`` (``--long-precision``; more ``key=value`` overrides with ``--long-overrides``), whose own
  samples/s line is reported too (steady-state speed, where start-up matters little).

Reported per command and side: median wall seconds (min..max), median peak RSS of the process (``ru_maxrss`` from
``os.wait4``), the samples/s the training commands print, and the median (min..max) of the per-repeat ratios
baseline / this tree for wall time. Nothing leaves the machine; every output goes to a temporary directory.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "src"


def run(src: Path, args: list[str], cwd: Path) -> tuple[float, float, float | None]:
    """Wall seconds, peak RSS (MB) and printed samples/s (or None) of one command run from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "clipforge.cli.main", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} from {src} failed ({proc.returncode}):\n{out[-3000:]}")
    rate = re.search(r"trained \d+ steps, ([\d.]+) samples/s", out)
    return wall, usage.ru_maxrss / 1024, float(rate.group(1)) if rate else None


def span(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline-src", type=Path, required=True,
                    help="the src directory of the checkout to compare with (e.g. a `git worktree` of an older commit)")
    ap.add_argument("--repeats", type=int, default=5, help="runs of each command per side (default 5)")
    ap.add_argument("--commands", nargs="+", choices=("train-2", "eval", "index"), default=["train-2", "eval"],
                    help="the commands to time (default train-2 eval)")
    ap.add_argument("--model", default="tiny", help="the random model eval and index run (default tiny)")
    ap.add_argument("--images", type=int, default=128, help="images the index command embeds (default 128)")
    ap.add_argument("--long-steps", type=int, default=0, metavar="N",
                    help="also time a bf16 training run of N steps (default: no)")
    ap.add_argument("--long-precision", choices=("bf16", "fp32"), default="bf16",
                    help="the precision of the --long-steps run (default bf16)")
    ap.add_argument("--long-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                    help="more config overrides of the --long-steps run, e.g. distributed.nproc=2")
    args = ap.parse_args()
    sides = {"this tree": HERE, "baseline": args.baseline_src.resolve()}
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        tmp = Path(tmp)
        sys.path.insert(0, str(HERE))
        import clipforge
        from clipforge.models import save_model

        model = save_model(clipforge.create_model(args.model, seed=0), tmp / "model")
        images = tmp / "images"
        if "index" in args.commands:
            from PIL import Image

            from clipforge.data.shapes import ShapesGenerator

            images.mkdir()
            gen = ShapesGenerator("val", seed=0, image_size=256)
            for i in range(args.images):
                Image.fromarray(gen.sample(i).image).save(images / f"{i:05d}.png")
        commands = {
            "train-2": lambda out: ["train", "--no-eval", "model=tiny", "steps=2", "batch_size=32", f"out_dir={out}",
                                    "save_every=100000"],
            "eval": lambda out: ["eval", str(model), "--suite", "quick", "--size", "64", "--no-report", "--no-cache",
                                 "--quiet", "--out", str(out)],
            "index": lambda out: ["index", str(model), "--images", str(images), "--out", str(out), "--quiet",
                                  "--dtype", "float32"],
        }
        commands = {name: make for name, make in commands.items() if name in args.commands}
        if args.long_steps:
            commands[f"train-{args.long_steps}"] = lambda out: [
                "train", "--no-eval", "model=tiny", f"steps={args.long_steps}", "batch_size=128",
                f"precision={args.long_precision}", f"out_dir={out}", "save_every=100000", *args.long_overrides]
        results = {(c, s): [] for c in commands for s in sides}
        for r in range(args.repeats):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name, make in commands.items():
                for side in order:
                    out = tmp / f"{name}-{side.replace(' ', '_')}-{r}"
                    results[(name, side)].append(run(sides[side], make(out), tmp))
                    wall, rss, rate = results[(name, side)][-1]
                    print(f"repeat {r + 1} {name} {side}: {wall:.2f} s, {rss:.0f} MB"
                          + (f", {rate:.0f} samples/s" if rate else ""), file=sys.stderr, flush=True)
    print(f"\n{os.cpu_count()} cores, {args.repeats} repeats, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| command | side | wall s | peak RSS MB | samples/s | wall ratio baseline / this tree |")
    print("|---|---|---:|---:|---:|---:|")
    for name in commands:
        ratios = [b[0] / t[0] for t, b in zip(results[(name, "this tree")], results[(name, "baseline")])]
        for side in sides:
            rows = results[(name, side)]
            rates = [x[2] for x in rows if x[2] is not None]
            print(f"| {name} | {side} | {span([x[0] for x in rows])} | {span([x[1] for x in rows], '{:.0f}')} | "
                  f"{span(rates, '{:.0f}') if rates else ''} | {span(ratios) + 'x' if side == 'this tree' else ''} |")


if __name__ == "__main__":
    main()
