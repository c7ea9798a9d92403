"""Quality per CPU-minute: clipforge and OpenCLIP train the same CLIP on the same data for the same wall-clock.

    python benchmarks/bench_quality_per_minute.py [--minutes 5] [--rounds 2] [--threads 2] [--precision fp32]

Both libraries train the same architecture (default ``tiny``; ``--overrides`` as in bench_train_throughput.py)
from scratch on the same pre-rendered ``shapes`` training set (``--train-size`` scenes rendered once at the
model's image size, each caption tokenized once with clipforge's tokenizer, which is CLIP's BPE as OpenCLIP's is),
in the same order (one plan of batch indices and caption choices per round's seed, read by both; the same seed
also initializes both models, each library its own way), with the
same hyperparameters (batch 128, AdamW lr 2e-3, betas 0.9/0.98, eps 1e-6, weight decay 0.1 off the gains and
biases, 30 warmup steps then cosine), each for ``--minutes`` of training wall-clock. Each side uses its own
library the way its training program does: clipforge's model, ``clip_loss`` and ``build_optimizer`` (fused
AdamW); OpenCLIP's ``open_clip.CLIP``, ``ClipLoss``, ``torch.optim.AdamW`` with its training script's parameter
groups, and the clamp of the logit scale to ln 100 after every step. The schedule runs on the clock, the same rule
for both sides: 30 warmup steps, then a cosine over the wall-clock left of the budget (``lr_at``), so each side's
rate reaches zero when its minutes end, whatever its step time; the faster library takes more steps in the same
minutes, which is what is measured. (An earlier version sized a step-count cosine from 3 timed trial steps; they
overestimated the step time, and schedules ended up to 22% before the budget.)

Each side runs in its own process (OpenCLIP in its venv, ``CLIPFORGE_OPENCLIP_PYTHON`` or the one
bench_train_throughput.py builds); the order alternates between rounds. Both trained models are evaluated here by
clipforge: clipforge's weights directly, OpenCLIP's state dict read by ``clipforge.load(path, model_config=...)``
(the interop path users take), then ``evaluate_shapes`` (held-out color-shape pairs zero-shot, shape, color,
count, val retrieval; the same ``--eval-size`` samples for both). Prints a table per round and the median
over rounds; ``--json`` writes everything.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BATCH, LR, BETAS, EPS, WD, WARMUP = 128, 2e-3, (0.9, 0.98), 1e-6, 0.1, 30


def openclip_config(spec: dict) -> dict:
    """The OpenCLIP model config of a clipforge spec (the same mapping bench_train_throughput uses)."""
    v, t = spec["vision"], spec["text"]
    return {"embed_dim": spec["embed_dim"],
            "vision_cfg": {"image_size": v["image_size"], "patch_size": v["patch_size"], "width": v["width"],
                           "layers": v["layers"], "head_width": v["width"] // v["heads"], "mlp_ratio": v["mlp_ratio"]},
            "text_cfg": {"context_length": t["context_length"], "vocab_size": t["vocab_size"], "width": t["width"],
                         "heads": t["heads"], "layers": t["layers"], "mlp_ratio": t["mlp_ratio"]}}


def prepare_data(spec: dict, train_size: int, max_steps: int, path: Path, seeds: list[int]) -> None:
    """Render the training scenes, tokenize their captions and draw a batch plan per seed; one file both sides
    read."""
    import numpy as np
    import torch

    from clipforge.data import build_dataset
    from clipforge.tokenizer import get_tokenizer

    ds = build_dataset("shapes", split="train", size=train_size, seed=0, image_size=spec["vision"]["image_size"])
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([it["image"] for it in items])  # uint8 [N, 3, S, S]
    tok = get_tokenizer(spec["text"]["context_length"])
    per = max(len(it["captions"]) for it in items)
    tokens = torch.zeros(len(items), per, spec["text"]["context_length"], dtype=torch.long)
    counts = torch.tensor([len(it["captions"]) for it in items])
    for i, it in enumerate(items):
        tokens[i, :len(it["captions"])] = tok(list(it["captions"]))
    plans = {}
    for seed in sorted(set(seeds)):
        rng = np.random.default_rng(seed)
        order = np.stack([rng.choice(len(items), BATCH, replace=False) for _ in range(max_steps)])
        caption = (rng.random(order.shape) * counts.numpy()[order]).astype(np.int64)
        plans[seed] = (torch.from_numpy(order), torch.from_numpy(caption))
    torch.save({"images": images, "tokens": tokens, "plans": plans}, path)


def lr_at(step: int, elapsed: float, warmup_end: float | None, seconds: float) -> float:
    """Linear warmup over the first WARMUP steps, then a cosine over the wall-clock: ``elapsed`` seconds into a
    budget of ``seconds``, the warmup having ended at ``warmup_end`` seconds."""
    if step < WARMUP or warmup_end is None:
        return LR * (step + 1) / WARMUP
    progress = min(1.0, (elapsed - warmup_end) / max(1e-9, seconds - warmup_end))
    return LR * 0.5 * (1 + math.cos(math.pi * progress))


def worker(impl: str, spec: dict, data_path: str, out: str, seconds: float, precision: str, threads: int,
           seed: int = 0) -> dict:
    """Train one side for ``seconds`` of wall-clock from seed ``seed`` (initialization and batch plan) and save its
    state dict to ``out``."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data = torch.load(data_path)
    images, tokens = data["images"], data["tokens"]
    order, caption = data["plans"][seed]
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)  # CLIP's, in both libraries
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    if impl == "clipforge":
        from clipforge.losses import clip_loss
        from clipforge.models import CLIP, CLIPConfig
        from clipforge.train.optim import build_optimizer

        model = CLIP(CLIPConfig.from_dict(spec)).train()
        opt = build_optimizer(model, LR, WD, BETAS, EPS)

        def step_loss(img, txt):
            o = model(img, txt)
            return clip_loss(o["image_features"].float(), o["text_features"].float(), o["logit_scale"].float())

        def after_step():
            pass
    else:
        import open_clip

        model = open_clip.CLIP(**openclip_config(spec)).train()
        loss_fn = open_clip.ClipLoss()
        # open_clip_train/main.py: no weight decay on gains, biases, embeddings' norms and logit_scale
        def exclude(n, p):
            return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                                 {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": WD}],
                                lr=LR, betas=BETAS, eps=EPS)

        def step_loss(img, txt):
            i, t, s = model(img, txt)
            return loss_fn(i.float(), t.float(), s.float())

        def after_step():
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))

    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else None

    def batch(step: int):
        idx = order[step]
        img = (images[idx].float() / 255.0 - mean) / std
        return img, tokens[idx, caption[step]]

    def one_step(step: int, lr: float) -> float:
        for g in opt.param_groups:
            g["lr"] = lr
        img, txt = batch(step)
        if autocast:
            with autocast():
                loss = step_loss(img, txt)
        else:
            loss = step_loss(img, txt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        after_step()
        return float(loss)

    start, losses, step, warmup_end, lrs = time.perf_counter(), [], 0, None, []
    while step < len(order):
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        if step == WARMUP:
            warmup_end = elapsed
        lrs.append(lr_at(step, elapsed, warmup_end, seconds))
        losses.append(one_step(step, lrs[-1]))
        step += 1
    train_s = time.perf_counter() - start
    torch.save(model.state_dict(), out)
    return {"impl": impl, "steps": step, "train_s": train_s, "samples_per_s": step * BATCH / train_s,
            "last_losses": losses[-3:], "last_lr": lrs[-1], "out_of_data": step == len(order)}


def evaluate(impl: str, spec: dict, weights: str, eval_size: int) -> dict:
    import torch

    import clipforge
    from clipforge.evaluation import evaluate_shapes
    from clipforge.models import CLIP, CLIPConfig
    from clipforge.tokenizer import get_tokenizer

    if impl == "clipforge":
        model = CLIP(CLIPConfig.from_dict(spec))
        model.load_state_dict(torch.load(weights))
    else:  # the way a user reads an OpenCLIP checkpoint into clipforge
        model = clipforge.load(weights, model_config=openclip_config(spec))[0]
    model.eval()
    res = evaluate_shapes(model, get_tokenizer(spec["text"]["context_length"]), size=eval_size)
    zs, rt = res["zero_shot"], res["retrieval"]["val"]
    return {"object_top1": zs["object"]["top1"], "shape_top1": zs["shape"]["top1"], "color_top1": zs["color"]["top1"],
            "count_top1": zs["count"]["top1"], "i2t_R@1": rt["i2t_R@1"], "t2i_R@1": rt["t2i_R@1"]}


def openclip_python() -> str:
    from bench_train_throughput import anchor_python

    py = anchor_python()
    if py is None:
        raise SystemExit("OpenCLIP's venv is missing: bash ../shared/anchors/openclip-venv.sh DIR, then "
                         "CLIPFORGE_OPENCLIP_PYTHON=DIR/bin/python")
    return str(py)


METRICS = ("object_top1", "shape_top1", "color_top1", "count_top1", "i2t_R@1", "t2i_R@1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--overrides", type=json.loads, default=None, help="JSON changes to the model config")
    ap.add_argument("--minutes", type=float, default=5.0, help="training wall-clock per side and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="seed of each round (initialization and batch plan, the same for both libraries); default "
                         "0, 1, ... (one seed per round); --seeds 0 0 repeats one seed to see timing noise alone")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="auto: bf16 where this CPU has fast bf16 kernels, else fp32 (clipforge.train.device)")
    ap.add_argument("--train-size", type=int, default=20_000)
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--json", help="write the rounds and the summary here")
    ap.add_argument("--_worker", choices=["clipforge", "openclip"], help=argparse.SUPPRESS)
    ap.add_argument("--_args", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        a = json.loads(args._args)
        print(json.dumps(worker(args._worker, a["spec"], a["data"], a["out"], a["seconds"], a["precision"],
                                a["threads"], a["seed"])))
        return

    from bench_train_throughput import model_spec

    from clipforge.train.device import device_plan

    precision = device_plan("cpu", args.precision).effective_precision
    spec = {**model_spec(args.model, args.overrides), "compile": False}
    work = Path(tempfile.mkdtemp(prefix="clipforge_qpm_"))
    seconds = 60 * args.minutes
    t0 = time.perf_counter()
    seeds = args.seeds or list(range(args.rounds))
    if len(seeds) != args.rounds:
        raise SystemExit(f"--seeds gives {len(seeds)} seeds for {args.rounds} rounds; give one per round")
    prepare_data(spec, args.train_size, max_steps=5_000, path=work / "data.pt", seeds=seeds)
    print(f"# {args.model}, batch {BATCH}, {args.train_size} shapes scenes rendered and tokenized in "
          f"{time.perf_counter() - t0:.0f} s; {args.minutes:g} min per side and round, {args.threads} threads, "
          f"{precision}; load average {os.getloadavg()[0]:.1f}", flush=True)
    pythons = {"clipforge": sys.executable, "openclip": openclip_python()}
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": str(args.threads)}
    rounds = []
    for r in range(args.rounds):
        sides = ["clipforge", "openclip"] if r % 2 == 0 else ["openclip", "clipforge"]
        row = {}
        for impl in sides:
            out = work / f"{impl}_{r}.pt"
            payload = json.dumps({"spec": spec, "data": str(work / "data.pt"), "out": str(out), "seconds": seconds,
                                  "precision": precision, "threads": args.threads, "seed": seeds[r]})
            done = subprocess.run([pythons[impl], __file__, "--_worker", impl, "--_args", payload], env=env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"the {impl} side failed:\n{done.stderr[-3000:]}")
            info = json.loads(done.stdout.strip().splitlines()[-1])
            info.update(evaluate(impl, spec, str(out), args.eval_size))
            info["load_average"], info["seed"] = os.getloadavg()[0], seeds[r]
            row[impl] = info
            print(f"  round {r + 1} (seed {seeds[r]}) {impl}: {info['steps']} steps in {info['train_s']:.0f} s "
                  f"({info['samples_per_s']:.1f} samples/s), object top-1 {info['object_top1']:.3f}, "
                  f"i2t/t2i R@1 {info['i2t_R@1']:.3f}/{info['t2i_R@1']:.3f}, load {info['load_average']:.1f}",
                  flush=True)
        rounds.append(row)
    names = {"clipforge": "clipforge", "openclip": "OpenCLIP"}
    print("\n| round | library | steps | samples/s | " + " | ".join(METRICS) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(METRICS))
    for r, row in enumerate(rounds):
        for impl in ("clipforge", "openclip"):
            i = row[impl]
            print(f"| {r + 1} | {names[impl]} | {i['steps']} | {i['samples_per_s']:.1f} | "
                  + " | ".join(f"{i[m]:.3f}" for m in METRICS) + " |")
    summary = {}
    for impl in ("clipforge", "openclip"):
        summary[impl] = {m: statistics.median(row[impl][m] for row in rounds)
                         for m in ("steps", "samples_per_s", *METRICS)}
        i = summary[impl]
        print(f"| median | {names[impl]} | {i['steps']:.0f} | {i['samples_per_s']:.1f} | "
              + " | ".join(f"{i[m]:.3f}" for m in METRICS) + " |")
    diffs = {m: [row["clipforge"][m] - row["openclip"][m] for row in rounds] for m in METRICS}
    print("| clipforge - OpenCLIP, per round | | | | " + " | ".join(
        ", ".join(f"{d:+.3f}" for d in diffs[m]) for m in METRICS) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "summary": summary, "precision": precision,
                                               "minutes": args.minutes, "spec": spec}, indent=1))


if __name__ == "__main__":
    main()
