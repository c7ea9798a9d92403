"""``clipforge demo``: train ``tiny`` on ``shapes`` for a fixed time budget, then evaluate.

The number of optimizer steps is chosen so that the cosine schedule ends when the time
budget does: a few timed steps on a synthetic batch measure this machine's speed first.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

DEMO_DEFAULTS = dict(model="tiny", batch_size=128, lr=2e-3, warmup_steps=30, weight_decay=0.1, precision="auto",
                     save_every=0, log_every=10)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Trains a CPU-sized CLIP on procedurally drawn shapes (no download), evaluates zero-shot\n"
                "classification on color-shape pairs never seen in training, counting, and retrieval,\n"
                "and prints each number beside its chance level.")
    p.add_argument("--seconds", type=float, default=150.0, help="training time budget in seconds (default 150)")
    p.add_argument("--out", default="runs/demo", help="run directory for metrics and checkpoints (default runs/demo)")
    p.add_argument("--train-size", type=int, default=20_000, help="number of training samples (default 20000)")
    p.add_argument("--eval-size", type=int, default=500, help="samples per evaluation split (default 500)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast precision (default auto: bf16 where this CPU has fast bf16 kernels, else fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's initialization and the data order")
    p.add_argument("--json", action="store_true", help="print one JSON object with the results as the last line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def estimate_step_seconds(cfg, trials: int = 3, precision: str | None = None) -> float:
    """Time forward+backward+update of one batch of the configured model on random data, in ``precision``
    (default the config's; ``auto`` must be resolved first)."""
    import torch

    from ..losses import LossInputs, build_composite
    from ..models import create_model
    from ..train.loop import autocast_context
    from ..train.optim import build_optimizer

    model = create_model(cfg.model, seed=0, **cfg.model_overrides)
    opt = build_optimizer(model, 1e-4, 0.0, cfg.betas, cfg.eps)
    loss_fn = build_composite(cfg.loss)
    images = torch.randn(cfg.batch_size, 3, model.image_size, model.image_size)
    texts = torch.randint(1, 1000, (cfg.batch_size, model.context_length))
    texts[:, 12] = model.cfg.text.eot_token_id
    times = []
    for i in range(trials + 1):
        t0 = time.perf_counter()
        with autocast_context(precision or cfg.precision):
            out = model(images, texts)
        loss = loss_fn(LossInputs(out["image_features"].float(), out["text_features"].float(), out["logit_scale"]))[
            "loss"
        ]
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# Fewer steps than this leave `tiny` near chance on the held-out pairs: 106 steps (fp32 on an AVX2-only CPU) reached
# 7.6x chance, 28 steps (a 2-core machine busy with two other jobs, 4.1 s per step) stayed below chance.
MIN_USEFUL_STEPS = 100
TARGET_STEPS = 300


def plan_steps(seconds: float, step_seconds: float) -> tuple[int, str | None]:
    """The number of steps that fit in ``seconds`` at ``step_seconds`` per bare step, and a warning when that is too
    few for the demo to learn anything (it names the ``--seconds`` that would give about ``TARGET_STEPS``)."""
    # rendering (first epoch), tokenization and logging add ~30% over the bare step time
    # (measured: 358 ms bare vs 466 ms in the loop); too many steps would leave the cosine
    # schedule unfinished when the time budget stops the run.
    loop_step = step_seconds * 1.3
    fit = int(seconds / loop_step)
    steps = max(20, fit)
    if fit >= MIN_USEFUL_STEPS:
        return steps, None
    need = math.ceil(TARGET_STEPS * loop_step / 10) * 10
    return steps, (
        f"clipforge demo: warning: only {fit} training steps fit in {seconds:.0f} s on this machine right now "
        f"({step_seconds * 1000:.0f} ms per step measured; an idle 2-core CPU with AVX-512 takes about 300 ms), "
        f"so expect numbers near chance. Give it more time (--seconds {need} for about {TARGET_STEPS} steps) or "
        f"run it when the machine is less busy.")


def run(args) -> int:
    from ..evaluation import evaluate_shapes
    from ..train import TrainConfig, train
    from ..train.config import DataConfig
    from .common import dump_json, eval_rows, table

    cfg = TrainConfig(**DEMO_DEFAULTS, out_dir=args.out, seed=args.seed, progress=not args.quiet,
                      data=DataConfig(train_size=args.train_size, eval_size=args.eval_size))
    cfg.precision = args.precision
    from ..train.device import device_plan

    precision = device_plan(cfg.device, cfg.precision).effective_precision  # what auto becomes on this machine
    step_s = estimate_step_seconds(cfg, precision=precision)
    cfg.steps, warning = plan_steps(args.seconds, step_s)
    if warning:
        print(warning, file=sys.stderr)
    cfg.warmup_steps = min(cfg.warmup_steps, cfg.steps // 5)
    cfg.max_seconds = args.seconds
    print(f"clipforge demo: training '{cfg.model}' on shapes for ~{args.seconds:.0f}s "
          f"({cfg.steps} steps of {cfg.batch_size}, {precision}, ~{step_s * 1000:.0f} ms/step measured)")
    result = train(cfg, evaluate=lambda model, tok: evaluate_shapes(model, tok, size=cfg.data.eval_size))
    ev = result.eval
    print()
    print(table(eval_rows(ev), ["task", "metric", "value", "chance"]))
    print(f"\n{result.step} steps, {result.samples_seen} samples in {result.train_seconds:.0f}s "
          f"({result.samples_per_second:.0f} samples/s); model saved in {cfg.out_dir}/checkpoints")
    print(
        f"try: clipforge eval {cfg.out_dir}    or    clipforge embed {cfg.out_dir} --texts 'a red circle' --out e.npy"
    )
    zs, rt = ev["zero_shot"]["object"], ev["retrieval"]["val"]
    summary = {
        "zero_shot_task": "color+shape of held-out (never trained) color-shape pairs",
        "zero_shot_top1": zs["top1"],
        "zero_shot_chance": zs["chance_top1"],
        "zero_shot_shape_top1": ev["zero_shot"]["shape"]["top1"],
        "zero_shot_color_top1": ev["zero_shot"]["color"]["top1"],
        "zero_shot_count_top1": ev["zero_shot"]["count"]["top1"],
        "retrieval_i2t_r1": rt["i2t_R@1"],
        "retrieval_t2i_r1": rt["t2i_R@1"],
        "retrieval_i2t_r1_chance": rt["i2t_R@1_chance"],
        "retrieval_t2i_r1_chance": rt["t2i_R@1_chance"],
        "samples_per_second": result.samples_per_second,
        "train_seconds": result.train_seconds,
        "precision": precision,
        "steps": result.step,
        "final_loss": result.losses[-1] if result.losses else None,
        "skipped_samples": result.skipped,
    }
    if args.json:
        print(dump_json(summary))
    return 0
