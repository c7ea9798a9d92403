"""``clipforge diffusion-feedback``: post-train a CLIP image tower through a frozen diffusion model (DIVA, un^2CLIP)."""
from __future__ import annotations

import argparse

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
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5, help="image tower learning rate (default 1e-5)")
    p.add_argument("--projection-lr", type=float, default=1e-3, help="diva's projection learning rate")
    p.add_argument("--train-size", type=int, default=4096, help="shapes train scenes (default 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args) -> int:
    import logging

    from .. import load
    from ..models import save_model
    from ..models.diffusion import load_diffusion
    from ..train.diffusion_feedback import FeedbackConfig, check_pair, diffusion_feedback

    log = logging.getLogger("clipforge.cli.diffusion_feedback")
    cfg = FeedbackConfig(method=args.method, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         projection_lr=args.projection_lr, train_size=args.train_size, seed=args.seed).validate()
    generator, _ = load_diffusion(args.diffusion)
    clip = load(args.model)[0]
    check_pair(clip, generator, cfg.method)
    every = max(1, cfg.steps // 10)

    def on_step(step: int, loss: float) -> None:
        if not args.quiet and (step + 1) % every == 0:
            log.info("step %d/%d  denoising loss %.4f", step + 1, cfg.steps, loss)

    clip, hist = diffusion_feedback(clip, generator, cfg, on_step)
    save_model(clip, args.out)
    print(f"{cfg.method}: denoising loss through the frozen generator {hist['loss_first']:.4f} -> "
          f"{hist['loss_last_10pct']:.4f} (mean of the last 10% of steps); image tower saved to {args.out}")
    return 0
