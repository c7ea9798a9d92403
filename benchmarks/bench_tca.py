"""TCA (token condensation as test-time adaptation) on ``shapes``: accuracy under distribution
shift, GFLOPs and images/s against plain zero-shot.

    clipforge train out_dir=/tmp/runs/adapt-base steps=400 lr=2e-3 warmup_steps=30 weight_decay=0.1
    OMP_NUM_THREADS=1 python benchmarks/bench_tca.py /tmp/runs/adapt-base

Test streams (the 5-class ``shape`` view, the evaluation suite's splits): ``clean`` (the odd half of
``val``, the in-distribution test split of ``clipforge adapt``), ``heldout`` (``compositional``:
color-shape pairs never seen in training) and the clean test images under corruptions from
:mod:`clipforge.evaluation.robustness` at one severity. Every stream starts with an empty
reservoir and runs in a seeded random order, ``--batch-size`` images per step (1, as the paper);
accuracies are the mean over ``--seeds`` orders (rows whose logits cannot depend on the order,
no correction and no anchors, run one order). Rows: plain zero-shot (TCA with keep ratio 1
and no correction, which is bit-identical to zero-shot, tested), the reservoir correction
alone, pruning alone (no fusion, no anchors, no correction: EViT without its fused token), TCA's
condensation without the correction, and full TCA at several keep ratios. GFLOPs are counted
per image from the token schedule (:func:`clipforge.adapt.tca.tca_flops`); images/s is the
measured stream speed on the clean split (reservoir work included), and of the bare condensed
forward at batch 128, on this machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from clipforge.adapt.tca import TCA, TCAConfig, run_stream
from clipforge.evaluation.cache import EmbeddingCache
from clipforge.evaluation.robustness import corrupt
from clipforge.evaluation.suite import Context
from clipforge.evaluation.suite_data import suite_data
from clipforge.interop import load
from clipforge.metrics import top1
from clipforge.transforms import normalize_batch

TRAIN_ARGS = ["steps=400", "lr=2e-3", "warmup_steps=30", "weight_decay=0.1"]


def _corrupted(images: list[torch.Tensor], name: str, severity: int) -> list[torch.Tensor]:
    from PIL import Image

    out = []
    for i, im in enumerate(images):
        pil = corrupt(Image.fromarray(im.permute(1, 2, 0).numpy()), name, severity, seed=i)
        out.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous())
    return out


def order_free(cfg: TCAConfig) -> bool:
    """True when the stream order cannot change the logits (no correction, no anchors in use)."""
    return cfg.correction_weight == 0 and (not cfg.anchors or cfg.keep_ratio >= 1.0)


def forward_speed(
    model, cls: torch.Tensor, pixels: torch.Tensor, cfg: TCAConfig, batch: int = 128, repeats: int = 3
) -> float:
    """Images/s of the (unanchored) condensed forward alone, ``batch`` images at a time, best of ``repeats``."""
    tca = TCA(model, cls, cfg)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for s in range(0, len(pixels), batch):
            tca.encode(pixels[s : s + batch])
        best = min(best, time.perf_counter() - t)
    return len(pixels) / best


def configs(keep_ratios: list[float], scale: float) -> dict[str, TCAConfig]:
    rows = {
        "zero-shot": TCAConfig(keep_ratio=1.0, correction_weight=0.0),
        "reservoir correction only (keep 1.0)": TCAConfig(keep_ratio=1.0),
    }
    mid = sorted(keep_ratios)[len(keep_ratios) // 2]
    rows[f"prune only (keep {mid})"] = TCAConfig(keep_ratio=mid, mode="prune", anchors=False, correction_weight=0.0)
    rows[f"TCA condensation only, no anchors (keep {mid})"] = TCAConfig(
        keep_ratio=mid, anchors=False, correction_weight=0.0
    )
    rows[f"TCA condensation only (keep {mid})"] = TCAConfig(keep_ratio=mid, correction_weight=0.0)
    for r in sorted(keep_ratios, reverse=True):
        rows[f"TCA (keep {r})"] = TCAConfig(keep_ratio=r)
    lam = round(3.0 * scale / 100.0, 3)  # the official lambda relative to the paper's logit scale of 100
    rows[f"TCA (keep {mid}, lambda {lam})"] = TCAConfig(keep_ratio=mid, correction_weight=lam)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "model", nargs="?", default="/tmp/runs/adapt-base", help="a trained run (default /tmp/runs/adapt-base)"
    )
    ap.add_argument("--keep-ratios", nargs="+", type=float, default=[0.9, 0.7, 0.5])
    ap.add_argument("--corruptions", nargs="+", default=["gaussian_noise", "gaussian_blur", "contrast", "pixelate"])
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="stream orders to average over")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--view", default="shape")
    ap.add_argument("--json", help="also write the full results here")
    args = ap.parse_args()
    if not (Path(args.model) / "checkpoints").exists() and not Path(args.model, "model_config.json").exists():
        print(
            f"no trained model at {args.model}; training one: clipforge train out_dir={args.model} "
            f"{' '.join(TRAIN_ARGS)}"
        )
        subprocess.run([sys.executable, "-m", "clipforge.cli.main", "train", f"out_dir={args.model}", *TRAIN_ARGS],
                       check=True)
    torch.set_num_threads(1)
    model, tokenizer, _ = load(args.model)
    model.eval()
    data = suite_data("shapes", model.image_size, 500, 12345)
    ctx = Context(model, tokenizer, data, EmbeddingCache(model, None))
    _, _, test, held = data.probe_splits(args.view)
    cls = ctx.classifier(test.classnames, test.templates)
    scale = ctx.scale
    streams = {"clean": (test.images, test.labels), "heldout": (held.images, held.labels)}
    for name in args.corruptions:
        streams[f"{name}:{args.severity}"] = (_corrupted(test.images, name, args.severity), test.labels)
    clean_pixels = normalize_batch(torch.stack(test.images))
    t0 = time.perf_counter()
    results: dict = {
        "model": args.model,
        "view": args.view,
        "logit_scale": scale,
        "n": {k: len(v[1]) for k, v in streams.items()},
        "seeds": args.seeds,
        "batch_size": args.batch_size,
        "rows": {},
    }
    for row, cfg in configs(args.keep_ratios, scale).items():
        acc: dict[str, list[float]] = {k: [] for k in streams}
        speed, flops = [], None
        for seed in args.seeds[:1] if order_free(cfg) else args.seeds:
            for name, (images, labels) in streams.items():
                order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
                out = run_stream(model, cls, images, cfg, args.batch_size, order, scale)
                acc[name].append(top1(out["logits"], labels))
                flops = out["flops"]
                if name == "clean":
                    speed.append(out["images_per_second"])
        results["rows"][row] = {"accuracy": {k: float(np.mean(v)) for k, v in acc.items()},
                                "accuracy_std": {k: float(np.std(v)) for k, v in acc.items()},
                                "images_per_second": float(np.median(speed)), "flops": flops,
                                "forward_images_per_second": forward_speed(model, cls, clean_pixels, cfg),
                                "config": {k: v for k, v in vars(cfg).items()}}
        r = results["rows"][row]
        print(f"{row}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["accuracy"].items())
              + f"; {flops['gflops_tca']:.4f} GFLOPs ({flops['saved']:.1%} saved), {r['images_per_second']:.0f} img/s",
              file=sys.stderr, flush=True)
    results["seconds"] = time.perf_counter() - t0
    names = list(streams)
    zs = results["rows"]["zero-shot"]["accuracy"]
    shifted = [k for k in names if k != "clean"]
    print(f"\n{args.model}: shapes / {args.view} (5 classes, chance 0.200), logit scale {scale:.1f}; "
          f"n = " + ", ".join(f"{k} {v}" for k, v in results["n"].items())
          + f"; mean over stream orders {args.seeds}, batch {args.batch_size}; {results['seconds']:.0f} s\n")
    print("| method | " + " | ".join(names) + " | mean shifted | GFLOPs/img | saved | tokens x blocks | img/s stream "
          f"(batch {args.batch_size}) | img/s forward (batch 128) |")
    print("|---|" + "---:|" * (len(names) + 6))
    for row, r in results["rows"].items():
        a, f = r["accuracy"], r["flops"]
        cells = [f"{a[k]:.3f}" + ("" if row == "zero-shot" else f" ({a[k] - zs[k]:+.3f})") for k in names]
        mean_shift = np.mean([a[k] for k in shifted])
        print(f"| {row} | " + " | ".join(cells) + f" | {mean_shift:.3f} | {f['gflops_tca']:.4f} | {f['saved']:.1%} | "
              f"{f['token_blocks_tca']} | {r['images_per_second']:.0f} | {r['forward_images_per_second']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
