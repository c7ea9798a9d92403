"""Improving a CLIP image tower through a frozen generative model: DIVA and un^2CLIP.

First a small conditional diffusion model (:mod:`clipforge.models.diffusion`) is trained on ``shapes`` images at 32 px,
conditioned on a frozen CLIP's embeddings (:func:`train_diffusion`, ``clipforge train-diffusion``): its image
embeddings (an unCLIP-style decoder) or its text embeddings of the captions (a Stable-Diffusion-style
text-to-image model). Then the diffusion model is frozen and the CLIP image tower is post-trained through its
denoising loss (:func:`diffusion_feedback`, ``clipforge diffusion-feedback``):

- ``diva`` (Wang et al., "Diffusion Feedback Helps CLIP See Better", 2024): the condition is the generator's
  empty-prompt condition plus a trainable linear projection of the CLIP image features,
  ``c = c_null + W f_img(x)``; the loss is the diffusion model's L_simple, ``E ||eps - eps_theta(x_t, t, c)||^2``,
  minimized over the image tower and W only (images only, no text). As in DIVA's code the generator is a
  text-conditioned model (``condition: text``) whose empty-prompt embedding is ``null_condition``.
  Simplification: the condition is the pooled image embedding, not DIVA's class token plus a subset of patch tokens.
- ``un2clip`` (Li et al., "un^2CLIP: Improving CLIP's Visual Detail Capturing Ability via Inverting unCLIP", 2025):
  the generator is an unCLIP decoder, conditioned on CLIP image embeddings (``condition: image``); the image tower is
  trained so that its embedding, fed to the frozen decoder, minimizes the decoder's denoising loss,
  ``min_theta E ||eps - eps_dec(x_t, t, f_img_theta(x))||^2``, with no projection, so the embedding stays in the
  space the decoder (and the frozen text tower) share. Its official code (github.com/LiYinqi/un2CLIP) was not in
  the code index this was written from; this follows the abstract and the unCLIP set-up it inverts. Simplification:
  no noise augmentation of the condition and no other regularizer.

In both methods the text tower, the logit scale and the diffusion model get no gradient (tests/train/
test_diffusion_feedback.py::test_gradient_reaches_only_the_image_tower).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..models.diffusion import ConditionalUNet, DiffusionConfig, ddpm_loss
from ..transforms import normalize

log = logging.getLogger(__name__)
METHODS = ("diva", "un2clip")
CONDITIONS = ("image", "text")


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ConfigError(f"{name.replace('_', '-')} must be positive, got {v}")


@dataclass
class DiffusionTrainConfig:
    """``clipforge train-diffusion``: AdamW with a cosine schedule on ``shapes`` train images."""

    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    train_size: int = 4096
    image_size: int = 32
    channels: int = 32
    timesteps: int = 200
    condition: str = "image"
    cond_drop: float = 0.1
    seed: int = 0

    def validate(self) -> DiffusionTrainConfig:
        _check_positive(steps=self.steps, batch_size=self.batch_size, lr=self.lr, train_size=self.train_size)
        if self.condition not in CONDITIONS:
            raise ConfigError(f"--condition must be one of {CONDITIONS}, got {self.condition!r}")
        if not 0 <= self.cond_drop < 1:
            raise ConfigError(f"--cond-drop must be in [0, 1), got {self.cond_drop}")
        return self


@dataclass
class FeedbackConfig:
    """``clipforge diffusion-feedback``: AdamW on the image tower (and DIVA's projection) for ``steps`` steps."""

    method: str = "un2clip"
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-5
    projection_lr: float = 1e-3
    train_size: int = 4096
    seed: int = 0

    def validate(self) -> FeedbackConfig:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {METHODS}, got {self.method!r}")
        _check_positive(steps=self.steps, batch_size=self.batch_size, lr=self.lr, projection_lr=self.projection_lr,
                        train_size=self.train_size)
        return self


# ------------------------------------------------------------------------------------------ data
def shapes_images(n: int, seed: int, image_size: int, split: str = "train") -> tuple[Tensor, list[str]]:
    """``n`` shapes scenes as uint8 [n, 3, S, S] and each scene's first caption."""
    from ..data.shapes import ShapesGenerator

    gen = ShapesGenerator(split, seed, image_size)
    images, captions = [], []
    for i in range(n):
        s = gen.sample(i)
        images.append(torch.from_numpy(s.image).permute(2, 0, 1))
        captions.append(s.captions[0])
    return torch.stack(images), captions


def clip_pixels(images: Tensor, size: int) -> Tensor:
    """uint8 [B, 3, H, W] -> the CLIP input at ``size`` px (resized if needed, OpenAI mean/std)."""
    x = images.float() / 255
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x)


def diffusion_pixels(images: Tensor, size: int) -> Tensor:
    """uint8 [B, 3, H, W] -> the diffusion model's x_0 in [-1, 1] at ``size`` px."""
    x = images.float() / 255
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x * 2 - 1


@torch.no_grad()
def encode_conditions(clip, images: Tensor, captions: list[str], condition: str, batch: int = 256) -> Tensor:
    """The frozen CLIP's normalized embeddings of the images (``image``) or of their captions (``text``)."""
    from ..tokenizer import get_tokenizer

    was = clip.training
    clip.eval()
    out = []
    tok = get_tokenizer(clip.context_length) if condition == "text" else None
    for i in range(0, len(images), batch):
        if condition == "image":
            out.append(clip.encode_image(clip_pixels(images[i:i + batch], clip.image_size)).float())
        else:
            out.append(clip.encode_text(tok(captions[i:i + batch])).float())
    clip.train(was)
    return torch.cat(out)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------------------------------ training
def train_diffusion(clip, cfg: DiffusionTrainConfig,
                    on_step: Callable[[int, float], None] | None = None) -> tuple[ConditionalUNet, dict]:
    """Train a :class:`ConditionalUNet` on shapes conditioned on ``clip``'s (frozen) embeddings."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    model = ConditionalUNet(DiffusionConfig(image_size=cfg.image_size, cond_dim=clip.cfg.embed_dim,
                                            channels=cfg.channels, timesteps=cfg.timesteps, condition=cfg.condition))
    images, captions = shapes_images(cfg.train_size, cfg.seed, clip.image_size)
    conds = encode_conditions(clip, images, captions, cfg.condition)
    x0_all = diffusion_pixels(images, cfg.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _cosine(step, cfg.steps, max(1, cfg.steps // 20))
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
        cond = conds[idx]
        drop = torch.rand(len(idx), generator=g) < cfg.cond_drop
        cond = torch.where(drop[:, None], model.null_condition.expand_as(cond), cond)
        loss = ddpm_loss(model, x0_all[idx], cond, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return model, {"loss_first": losses[0], "loss_last_10pct": float(np.mean(tail)), "steps": cfg.steps}


class FeedbackCondition(nn.Module):
    """The condition the frozen generator receives from the CLIP image tower, per method (module docstring)."""

    def __init__(self, method: str, embed_dim: int, diffusion: ConditionalUNet):
        super().__init__()
        self.method = method
        self.projection = nn.Linear(embed_dim, diffusion.cfg.cond_dim) if method == "diva" else None
        self.null = diffusion.null_condition  # frozen with the generator

    def forward(self, image_features: Tensor) -> Tensor:
        if self.projection is None:
            return image_features
        return self.null.detach() + self.projection(image_features)


def check_pair(clip, diffusion: ConditionalUNet, method: str) -> None:
    """A clear error when the generator cannot serve ``method`` with ``clip``."""
    if method == "un2clip":
        if diffusion.cfg.condition != "image":
            raise ConfigError("un2clip inverts an unCLIP decoder: the diffusion model must be conditioned on CLIP "
                              f"image embeddings, this one on {diffusion.cfg.condition!r}; train one with "
                              "`clipforge train-diffusion MODEL --condition image`")
        if diffusion.cfg.cond_dim != clip.cfg.embed_dim:
            raise ConfigError(f"the diffusion model takes {diffusion.cfg.cond_dim}-d conditions but the CLIP embeds "
                              f"in {clip.cfg.embed_dim} dimensions; train the diffusion model on this CLIP")


def diffusion_feedback(clip, diffusion: ConditionalUNet, cfg: FeedbackConfig,
                       on_step: Callable[[int, float], None] | None = None) -> tuple[nn.Module, dict]:
    """Post-train ``clip``'s image tower (in place) through the frozen ``diffusion`` model; returns (clip, history)."""
    cfg.validate()
    check_pair(clip, diffusion, cfg.method)
    torch.manual_seed(cfg.seed)
    flags = {n: p.requires_grad for n, p in clip.named_parameters()}
    clip.requires_grad_(False)
    clip.visual.requires_grad_(True)
    diffusion.requires_grad_(False).eval()
    condition = FeedbackCondition(cfg.method, clip.cfg.embed_dim, diffusion)
    groups = [{"params": list(clip.visual.parameters()), "lr": cfg.lr}]
    if condition.projection is not None:
        groups.append({"params": list(condition.projection.parameters()), "lr": cfg.projection_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base = [g["lr"] for g in groups]
    images, _ = shapes_images(cfg.train_size, cfg.seed + 7919, clip.image_size)  # other scenes than the generator's
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    clip.train()
    try:
        for step in range(cfg.steps):
            for group, lr in zip(opt.param_groups, base):
                group["lr"] = lr * _cosine(step, cfg.steps, max(1, cfg.steps // 20))
            idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
            batch = images[idx]
            feats = clip.encode_image(clip_pixels(batch, clip.image_size))
            loss = ddpm_loss(diffusion, diffusion_pixels(batch, diffusion.cfg.image_size), condition(feats),
                             generator=g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        for n, p in clip.named_parameters():
            p.requires_grad_(flags[n])
        clip.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return clip, {"method": cfg.method, "loss_first": losses[0], "loss_last_10pct": float(np.mean(tail)),
                  "steps": cfg.steps}


__all__ = ["CONDITIONS", "METHODS", "DiffusionTrainConfig", "FeedbackCondition", "FeedbackConfig", "check_pair",
           "clip_pixels", "diffusion_feedback", "diffusion_pixels", "encode_conditions", "shapes_images",
           "train_diffusion"]
