"""``clipforge train-diffusion``: a small conditional diffusion model on shapes, conditioned on a frozen CLIP."""
from __future__ import annotations

import argparse

from .common import add_overwrite_argument, add_shapes_training_arguments, check_output_dir, step_logger

EPILOG = """\
the generator DIVA and un^2CLIP post-train a CLIP image tower through (clipforge diffusion-feedback):
a DDPM U-Net at --image-size px on shapes train scenes, conditioned on the CLIP's image embeddings
(--condition image: an unCLIP-style decoder, for un2clip) or on its text embeddings of the captions
(--condition text: a Stable-Diffusion-style generator, for diva); the CLIP stays frozen.

  clipforge train-diffusion runs/a --condition image --steps 600 --out runs/a-unclip
  clipforge diffusion-feedback runs/a --diffusion runs/a-unclip --method un2clip --out runs/a-un2clip
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("model", help="the CLIP whose embeddings condition the generator (anything clipforge.load reads)")
    p.add_argument("--out", required=True, help="output directory (diffusion.json + diffusion.safetensors)")
    add_overwrite_argument(p)
    p.add_argument("--condition", default="image", help="image (unCLIP-style, for un2clip) or text (for diva)")
    add_shapes_training_arguments(p, steps=600, batch_size=64, lr=2e-3)
    p.add_argument("--image-size", type=int, default=32, help="generator resolution, a multiple of 4 (default 32)")
    p.add_argument("--channels", type=int, default=32, help="U-Net base width (default 32)")
    p.add_argument("--timesteps", type=int, default=200, help="DDPM steps T (default 200)")
    p.add_argument("--cond-drop", type=float, default=0.1, help="probability of the null condition (default 0.1)")


def run(args) -> int:
    import json
    import logging

    from .. import load
    from ..models.diffusion import DiffusionConfig, save_diffusion
    from ..train.diffusion_feedback import DiffusionTrainConfig, train_diffusion

    check_output_dir(args.out, args.overwrite)  # before anything loads or trains
    log = logging.getLogger("clipforge.cli.train_diffusion")
    cfg = DiffusionTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, train_size=args.train_size,
                               image_size=args.image_size, channels=args.channels, timesteps=args.timesteps,
                               condition=args.condition, cond_drop=args.cond_drop, seed=args.seed).validate()
    DiffusionConfig(image_size=cfg.image_size, channels=cfg.channels, timesteps=cfg.timesteps,
                    condition=cfg.condition).validate()  # every bad value before the model loads
    clip = load(args.model)[0].eval()
    model, hist = train_diffusion(clip, cfg, step_logger(log, cfg.steps, args.quiet))
    save_diffusion(model, args.out, {"clip": str(args.model), "history": json.dumps(hist)})
    print(f"diffusion model ({cfg.condition}-conditioned, {cfg.image_size} px, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters): loss {hist['loss_first']:.4f} -> "
          f"{hist['loss_last_10pct']:.4f} (mean of the last 10% of steps); saved to {args.out}")
    return 0
