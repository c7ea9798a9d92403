"""DIVA and un^2CLIP on ``shapes``: do fine-grained questions improve after post-training the image tower through a
frozen diffusion model, and is zero-shot kept?

Per seed: a small CLIP (32 px, 2 layers) is trained with the CLIP loss on shapes (``--clip-steps``); two diffusion
models are trained on its frozen embeddings (``clipforge.train.diffusion_feedback.train_diffusion``): an unCLIP-style
one conditioned on its image embeddings (for un^2CLIP) and a text-conditioned one (for DIVA, as DIVA uses Stable
Diffusion); then each arm post-trains the image tower for ``steps`` steps and is measured with the MMVP-style pairs
(``clipforge.evaluation.shapes_mmvp``) and shapes zero-shot. The ``base`` arm is the CLIP before post-training. The
base CLIP and both generators are cached per seed and budget in ``--cache`` so that the three arms share them.

    python benchmarks/bench_diffusion_feedback.py --seed 0 --steps 60          # one seed, all arms, printed
    python benchmarks/fidelity.py diffusion_feedback --seeds 0 1 2             # the recipe
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("CLIPFORGE_BENCH_CACHE", "/tmp/clipforge-bench-diffusion-feedback"))
SMALL = {"embed_dim": 64, "vision": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2},
         "text": {"context_length": 32, "width": 64, "layers": 2, "heads": 2}}
ARMS = ("base", "diva", "un2clip")


def base_and_generators(seed: int, clip_steps: int, diffusion_steps: int, batch: int, channels: int):
    """(CLIP, image-conditioned generator, text-conditioned generator) for ``seed``, trained once and cached."""
    from clipforge import load
    from clipforge.models import save_model
    from clipforge.models.diffusion import load_diffusion, save_diffusion
    from clipforge.train import TrainConfig, train
    from clipforge.train.diffusion_feedback import DiffusionTrainConfig, train_diffusion

    root = CACHE / f"seed{seed}-clip{clip_steps}-diff{diffusion_steps}-b{batch}-c{channels}"
    if not (root / "clip" / "done").is_file():
        cfg = TrainConfig(model="tiny", model_overrides=dict(SMALL), steps=clip_steps, batch_size=128, lr=2e-3,
                          warmup_steps=max(1, clip_steps // 10), seed=seed, out_dir=str(root / "run"), save_every=0,
                          eval_every=0, progress=False)
        cfg.data.train_size = 10_000
        result = train(cfg)
        save_model(result.model, root / "clip")
        (root / "clip" / "done").write_text("ok")
    clip = load(str(root / "clip"))[0].eval()
    gens = {}
    for cond in ("image", "text"):
        d = root / f"diffusion-{cond}"
        if not (d / "diffusion.safetensors").is_file():
            dcfg = DiffusionTrainConfig(steps=diffusion_steps, batch_size=batch, condition=cond, seed=seed,
                                        channels=channels, train_size=4096)
            model, hist = train_diffusion(clip, dcfg)
            save_diffusion(model, d, {"history": json.dumps(hist)})
        gens[cond] = load_diffusion(d)[0]
    return clip, gens["image"], gens["text"]


def measure(model, eval_size: int) -> dict:
    from clipforge.evaluation.shapes_eval import evaluate_shapes
    from clipforge.evaluation.shapes_mmvp import evaluate_mmvp
    from clipforge.tokenizer import get_tokenizer

    tok = get_tokenizer(model.context_length)
    out = evaluate_mmvp(model, tok, n=eval_size, seed=12345)
    zs = evaluate_shapes(model, tok, size=eval_size, seed=12345)["zero_shot"]
    out.update({f"{view}_top1": zs[view]["top1"] for view in ("object", "shape", "count")})
    return out


def fidelity_arm(seed: int, steps: int, batch: int, eval_size: int, arm: str, clip_steps: int = 300,
                 diffusion_steps: int = 300, channels: int = 16, lr: float = 1e-5, projection_lr: float = 1e-3) -> dict:
    """One arm of the recipe ``diffusion_feedback``: ``base``, ``diva`` or ``un2clip`` (module docstring)."""
    from clipforge.train.diffusion_feedback import FeedbackConfig, diffusion_feedback

    if arm not in ARMS:
        raise ValueError(f"fidelity_arm: arm must be one of {ARMS}, got '{arm}'")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    clip, gen_image, gen_text = base_and_generators(seed, clip_steps, diffusion_steps, batch, channels)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hist = {}
    if arm != "base":
        cfg = FeedbackConfig(method=arm, steps=steps, batch_size=batch, lr=lr, projection_lr=projection_lr, seed=seed,
                             train_size=2048)
        clip, hist = diffusion_feedback(clip, gen_image if arm == "un2clip" else gen_text, cfg)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = measure(clip, eval_size)
    return {**out, "feedback_loss_first": hist.get("loss_first", float("nan")),
            "feedback_loss_last": hist.get("loss_last_10pct", float("nan")), "setup_s": setup_s, "train_s": train_s,
            "eval_s": time.perf_counter() - t0}


fidelity_arm.metrics = ("mmvp_count", "mmvp_position", "mmvp_size", "mmvp_mean", "object_top1", "shape_top1",
                        "count_top1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=60, help="post-training steps of each arm")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--clip-steps", type=int, default=300)
    ap.add_argument("--diffusion-steps", type=int, default=300)
    args = ap.parse_args()
    for arm in ARMS:
        r = fidelity_arm(args.seed, args.steps, args.batch, args.eval_size, arm, args.clip_steps, args.diffusion_steps)
        print(arm, json.dumps({k: round(v, 4) for k, v in r.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
