"""Shared pieces of the fidelity experiments (benchmarks/fidelity_*.py): train one arm of an
experiment, measure it with clipforge.evaluation, print markdown tables.

Every arm trains the `tiny` model on `shapes` from the same seed, on the same data order, for
the same number of steps at the same batch size; only the loss differs. Evaluation uses
held-out samples (evaluation seed 12345, training data seed 0).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable, Sequence

import torch

from clipforge.data import build_dataset
from clipforge.evaluation import encode_images, encode_texts, evaluate_shapes
from clipforge.tokenizer import get_tokenizer
from clipforge.train import DataConfig, TrainConfig, train

EVAL_SEED, EVAL_SIZE = 12345, 500


def parser(description: str, steps: int, batch: int) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=steps, help="optimizer steps per arm")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and arm; means are reported")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arms", type=int, nargs="+", default=None, help="run only these arms (0-based indices)")
    return ap


def train_arm(loss: dict, steps: int, seed: int, batch: int, overrides: dict | None = None, **cfg_fields):
    """Train `tiny` with ``loss``; returns the model (eval mode) and the training seconds."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model="tiny", model_overrides=overrides or {}, data=DataConfig(train_size=20_000),
                          loss=loss, batch_size=batch, steps=steps, lr=2e-3, warmup_steps=max(1, steps // 10),
                          save_every=0, eval_every=0, out_dir=out, progress=False, precision="bf16", seed=seed,
                          **cfg_fields)
        result = train(cfg)
    return result.model.eval(), result.train_seconds


def shapes_metrics(model) -> dict:
    """clipforge.evaluation.evaluate_shapes: zero-shot on held-out splits, retrieval on val."""
    ev = evaluate_shapes(model, get_tokenizer(model.context_length), size=EVAL_SIZE, seed=EVAL_SEED)
    zs, rt = ev["zero_shot"], ev["retrieval"]["val"]
    return {"object_top1": zs["object"]["top1"], "shape_top1": zs["shape"]["top1"], "color_top1": zs["color"]["top1"],
            "count_top1": zs["count"]["top1"], "i2t_R@1": rt["i2t_R@1"], "t2i_R@1": rt["t2i_R@1"]}


def split_features(model, split: str, size: int = EVAL_SIZE):
    """Images, first captions and the dataset items of a held-out split, encoded."""
    ds = build_dataset("shapes", split=split, size=size, seed=EVAL_SEED, image_size=model.image_size)
    items = [ds[i] for i in range(size)]
    tok = get_tokenizer(model.context_length)
    img = encode_images(model, [it["image"] for it in items])
    txt = encode_texts(model, [it["captions"][0] for it in items], tok)
    return img, txt, items, tok


def run_arms(arms: Sequence[tuple[str, dict, dict]], args, measure: Callable, **cfg_fields) -> list[dict]:
    """Train every (name, loss, model overrides) arm for every seed; ``measure(model)`` -> metrics.
    Returns one row per arm with the metrics averaged over seeds (and their spread)."""
    torch.set_num_threads(args.threads)
    args.load_at_start = os.getloadavg()[0]
    rows = []
    for i, (name, loss, overrides) in enumerate(arms):
        if args.arms is not None and i not in args.arms:
            continue
        runs = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            model, secs = train_arm(loss, args.steps, seed, args.batch, overrides, **cfg_fields)
            metrics = measure(model)
            metrics["train_s"] = secs
            runs.append(metrics)
            print(f"  {name} seed {seed}: {time.perf_counter() - t0:.0f}s  " +
                  " ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)
        row = {"arm": name}
        for key in runs[0]:
            vals = [r[key] for r in runs]
            row[key] = statistics.mean(vals)
            row[key + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
        rows.append(row)
    return rows


def print_table(title: str, rows: list[dict], columns: Sequence[tuple[str, str]], args) -> None:
    """A markdown table: one row per arm, mean (± sd over seeds when there are several)."""
    print(f"\n### {title}\n")
    print(f"tiny on shapes, {args.steps} steps x batch {args.batch}, seeds {args.seeds}, bf16, "
          f"{args.threads} threads, machine load average at start {args.load_at_start:.1f}\n")
    print("| arm | " + " | ".join(label for _, label in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for r in rows:
        cells = []
        for key, _ in columns:
            sd = r.get(key + "_sd")
            cells.append(f"{r[key]:.3f}" + (f" ± {sd:.3f}" if sd is not None else ""))
        print(f"| {r['arm']} | " + " | ".join(cells) + " |")
