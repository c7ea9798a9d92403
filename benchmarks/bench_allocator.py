"""What clipforge's malloc settings (``clipforge.allocator``) do to a training step: processes alternating.

    python benchmarks/bench_allocator.py [--model tiny] [--batch 128] [--steps 30] [--repeats 5]
        [--precision bf16 fp32] [--texts shapes] [--openclip] [--threads 2]
        [--overrides '{"vision": {"width": 512, "heads": 8}}']

glibc's settings are fixed when a process starts, so each measurement is its own process: one training run of
``bench_train_throughput.py``'s child mode (the same model, batch, AdamW, loss and token batches as that
benchmark), with ``CLIPFORGE_MALLOC=tuned`` (clipforge's default: ``allocator.configure()`` keeps freed blocks for
reuse) or ``CLIPFORGE_MALLOC=system`` (glibc's defaults). The two alternate, the first of each repeat rotating,
so that a shared machine's load hits both alike. ``--openclip`` adds OpenCLIP (its venv, see
bench_train_throughput.py) run both ways too, its "tuned" process given the same settings through the variables
glibc reads at start-up, to show whether the settings help any PyTorch training loop or clipforge's only.

Prints, per precision and library, samples/s of each process's median step (median over the repeats,
min..max), the minor page faults per step (warm-up steps included) and the peak resident memory, then the ratio
tuned / system of each repeat's pair (median, min..max).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_train_throughput as btt  # noqa: E402  (sibling module: model spec, token batches, child mode)


def child(impl: str, tuned: bool, spec: dict, texts_file: str, args, python: str) -> dict | None:
    """One training process; None (its stderr printed) when it failed."""
    # OpenCLIP gets the settings through glibc's variables; clipforge's child starts without them and its own
    # allocator.configure() decides, by CLIPFORGE_MALLOC
    env = btt.openclip_env(tuned and impl == "openclip")
    if impl == "clipforge":
        env["CLIPFORGE_MALLOC"] = "tuned" if tuned else "system"
    return btt.run_child(python, impl, spec, texts_file, args.batch, args.steps, args.threads, args.precision, env)


def _summary(values: list[float], fmt: str = ".1f") -> str:
    v = sorted(values)
    return f"{v[len(v) // 2]:{fmt}} ({v[0]:{fmt}}..{v[-1]:{fmt}})" if v else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--overrides", default="{}", help="JSON merged into the model config")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per process (after 3 warm-up steps)")
    ap.add_argument("--repeats", type=int, default=5, help="pairs of processes per library")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--texts", default="shapes", choices=["random", "random-stream", "shapes"])
    ap.add_argument("--openclip", action="store_true", help="measure OpenCLIP both ways too")
    args = ap.parse_args()

    import torch

    spec = btt.model_spec(args.model, json.loads(args.overrides))
    texts = btt.make_texts(spec, args.batch, args.texts, args.steps + 3)
    impls = [("clipforge", sys.executable)]
    if args.openclip:
        anchor = btt.anchor_python()
        if anchor is None:
            sys.exit("--openclip needs OpenCLIP's venv: bash ../shared/anchors/openclip-venv.sh ../.anchor-openclip")
        impls.append(("openclip", str(anchor)))
    arms = [(impl, python, tuned) for impl, python in impls for tuned in (True, False)]
    results: dict[tuple[str, bool], list[dict]] = {(impl, tuned): [] for impl, _, tuned in arms}
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = str(Path(tmp) / "texts.pt")
        torch.save(texts, texts_file)
        for r in range(args.repeats):
            order = arms[r % len(arms):] + arms[:r % len(arms)]
            for impl, python, tuned in order:
                out = child(impl, tuned, spec, texts_file, args, python)
                results[(impl, tuned)].append(out)
                if out:
                    rates = ", ".join(f"{p} {out[p]['samples_per_s']:.1f}/s" for p in args.precision)
                    print(f"repeat {r + 1}/{args.repeats} {impl} {'tuned' if tuned else 'system'}: {rates}",
                          file=sys.stderr, flush=True)

    v, t = spec["vision"], spec["text"]
    print(f"\nmodel={args.model} (vision {v['image_size']}px/patch {v['patch_size']}/width {v['width']}/"
          f"{v['layers']} layers; text width {t['width']}/{t['layers']} layers) batch={args.batch} "
          f"steps={args.steps} texts={args.texts} repeats={args.repeats} threads={args.threads} "
          f"torch={torch.__version__}\n")
    print("| precision | library | malloc | samples/s median (min..max) | minor faults per step | peak RSS MB "
          "| tuned / system per pair |")
    print("|---|---|---|---|---:|---:|---|")
    for p in args.precision:
        for impl, _ in impls:
            pairs = [(a[p]["samples_per_s"], b[p]["samples_per_s"])
                     for a, b in zip(results[(impl, True)], results[(impl, False)]) if a and b]
            r = sorted(a / b for a, b in pairs)
            for tuned in (True, False):
                runs = [o[p] for o in results[(impl, tuned)] if o]
                ratio = f"{r[len(r) // 2]:.2f}x ({r[0]:.2f}..{r[-1]:.2f})" if tuned and r else ""
                name = "clipforge" if impl == "clipforge" else "OpenCLIP"
                print(f"| {p} | {name} | {'clipforge settings' if tuned else 'glibc defaults'} | "
                      f"{_summary([o['samples_per_s'] for o in runs])} | "
                      f"{_summary([o['minor_faults_per_step'] for o in runs], '.0f')} | "
                      f"{_summary([o['peak_rss_mb'] for o in runs], '.0f')} | {ratio} |")


if __name__ == "__main__":
    main()
