"""``clipforge diffusion-feedback``: post-train a CLIP image tower through a frozen diffusion model (DIVA, un^2CLIP)."""
from __future__ import annotations

import argparse

from .common import add_overwrite_argument, add_shapes_training_arguments, check_output_dir, step_logger

EPILOG = """\
methods (clipforge.train.diffusion_feedback):
  diva     the generator's null condition plus a trained projection of the image features (a text-conditioned
           generator, as DIVA uses Stable Diffusion); Wang et al., 2024
  un2clip  the image embedding itself is the condition of an image-conditioned (unCLIP) generator; the text tower
           stays frozen, so the tower keeps CLIP's space; Li et al., 2025
only the image tower (and diva's projection) is trained; the text tower, logit scale and generator are frozen.

  clipforge train-diffusion runs/a --condition text --out runs/a-gen-text
  clipforge diffusion-feedback runs/a --diffusion runs/a-gen-text --method diva --steps 200 --out runs/a-diva
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("model", help="the CLIP to post-train (anything clipforge.load reads)")
    p.add_argument("--diffusion", required=True, help="a directory written by clipforge train-diffusion")
    p.add_argument("--method", required=True, help="diva or un2clip")
    p.add_argument("--out", required=True, help="output model directory (clipforge.load / clipforge eval)")
    add_overwrite_argument(p)
    add_shapes_training_arguments(p, steps=200, batch_size=32, lr=1e-5,
                                  lr_help="image tower learning rate (default 1e-5)")
    p.add_argument("--projection-lr", type=float, default=1e-3, help="diva's projection learning rate")


def run(args) -> int:
    import logging

    from .. import load
    from ..models import save_model
    from ..models.diffusion import load_diffusion
    from ..train.diffusion_feedback import FeedbackConfig, check_pair, diffusion_feedback

    check_output_dir(args.out, args.overwrite)  # before anything loads or trains
    log = logging.getLogger("clipforge.cli.diffusion_feedback")
    cfg = FeedbackConfig(method=args.method, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         projection_lr=args.projection_lr, train_size=args.train_size, seed=args.seed).validate()
    generator, _ = load_diffusion(args.diffusion)
    clip = load(args.model)[0]
    check_pair(clip, generator, cfg.method)
    clip, hist = diffusion_feedback(clip, generator, cfg, step_logger(log, cfg.steps, args.quiet, "denoising loss"))
    save_model(clip, args.out)
    print(f"{cfg.method}: denoising loss through the frozen generator {hist['loss_first']:.4f} -> "
          f"{hist['loss_last_10pct']:.4f} (mean of the last 10% of steps); image tower saved to {args.out}")
    return 0
