"""A small conditional diffusion model (DDPM) for images of 32-64 px, conditioned on a CLIP embedding.

It is the frozen generator that DIVA and un^2CLIP (:mod:`clipforge.train.diffusion_feedback`) post-train a CLIP image
tower through; ``clipforge train-diffusion`` trains it.

The noise schedule and the loss are those of DDPM (Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS
2020): linear betas ``beta_1 .. beta_T``, ``alpha_bar_t = prod_{s<=t} (1 - beta_s)``; the forward process (Eq. 4)

    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),
    so x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps

and the simplified objective (Eq. 14) ``L_simple = E_{t, x_0, eps} || eps - eps_theta(x_t, t, c) ||^2`` with t uniform
in 1..T (here 0..T-1) and eps ~ N(0, I). The network eps_theta is a small U-Net (two resolutions below the input, one
residual block each, skip connections); the timestep enters as a sinusoidal embedding through an MLP, and the
condition c (a CLIP embedding, image or text) is projected and added to that embedding, as unCLIP's decoder adds the
CLIP image embedding to GLIDE's timestep embedding (Ramesh et al., 2022, Sec. 2.1). ``null_condition`` is a learned
vector that stands for "no condition" (trained by dropping the condition with probability ``cond_drop``, as
classifier-free guidance does); DIVA adds its projected image features to it, as DIVA adds them to Stable
Diffusion's empty-prompt embedding.

Simplifications, said here and in docs/methods.md: pixel space (no VAE latent), one residual block per resolution,
no attention layers.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError


@dataclass(frozen=True)
class DiffusionConfig:
    image_size: int = 32
    cond_dim: int = 64
    channels: int = 32
    timesteps: int = 200
    beta_start: float = 1e-4
    beta_end: float = 0.02
    condition: str = "image"  # what the condition embeds: "image" (unCLIP-like) or "text" (Stable-Diffusion-like)

    def validate(self) -> DiffusionConfig:
        if self.image_size % 4 or not 8 <= self.image_size <= 128:
            raise ConfigError(f"diffusion image_size must be a multiple of 4 between 8 and 128, got {self.image_size}; "
                              "use 32 or 64")
        if self.timesteps < 2:
            raise ConfigError(f"diffusion timesteps must be at least 2, got {self.timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start} and {self.beta_end}")
        if self.condition not in ("image", "text"):
            raise ConfigError(f"diffusion condition must be 'image' or 'text', got {self.condition!r}")
        if self.cond_dim < 1 or self.channels < 4:
            raise ConfigError(f"cond_dim must be >= 1 and channels >= 4, got {self.cond_dim} and {self.channels}")
        return self


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """DDPM's linear schedule, float64 [T]."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM Eq. 4), per sample t [B]."""
    abar = alphas_cumprod.double().to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1)))
    # both coefficients in float64 first: 1 - alpha_bar_t at small t loses digits in float32
    return abar.sqrt().to(x0.dtype) * x0 + (1 - abar).sqrt().to(x0.dtype) * noise


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of integer timesteps [B] -> [B, dim] (the Transformer's position encoding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(8, cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(min(8, cout), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class ConditionalUNet(nn.Module):
    """eps_theta(x_t, t, c): a two-level U-Net at ``image_size`` px; see the module docstring."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.cfg = cfg.validate()
        c, emb = cfg.channels, cfg.channels * 4
        self.time_mlp = nn.Sequential(nn.Linear(c, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.cond_proj = nn.Sequential(nn.Linear(cfg.cond_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.null_condition = nn.Parameter(torch.zeros(cfg.cond_dim))
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.down1 = ResBlock(c, c, emb)
        self.pool1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.down2 = ResBlock(2 * c, 2 * c, emb)
        self.pool2 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)
        self.mid = ResBlock(2 * c, 2 * c, emb)
        self.up2 = ResBlock(4 * c, 2 * c, emb)
        self.up1 = ResBlock(3 * c, c, emb)
        self.out = nn.Sequential(nn.GroupNorm(min(8, c), c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - linear_betas(cfg.timesteps, cfg.beta_start,
                                                                               cfg.beta_end), 0), persistent=False)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if cond.shape[-1] != self.cfg.cond_dim:
            raise ValueError(f"the condition has {cond.shape[-1]} dimensions but the diffusion model was trained on "
                             f"{self.cfg.cond_dim}; use the CLIP it was trained with (or one of the same embed_dim)")
        emb = self.time_mlp(timestep_embedding(t, self.cfg.channels)) + self.cond_proj(cond)
        h0 = self.down1(self.inp(x), emb)
        h1 = self.down2(self.pool1(h0), emb)
        h = self.mid(self.pool2(h1), emb)
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h1], 1), emb)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h0], 1), emb)
        return self.out(h)

    def loss(self, x0: Tensor, cond: Tensor, t: Tensor | None = None, noise: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """L_simple (DDPM Eq. 14): the mean squared error of the predicted noise, t uniform in 0..T-1 unless given."""
        return ddpm_loss(self, x0, cond, t, noise, generator)

    @torch.no_grad()
    def sample(self, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Ancestral sampling (DDPM Algorithm 2, sigma_t^2 = beta_t) from N(0, I); images in [-1, 1]."""
        betas = linear_betas(self.cfg.timesteps, self.cfg.beta_start, self.cfg.beta_end).float()
        abar = self.alphas_cumprod.float()
        x = torch.randn(len(cond), 3, self.cfg.image_size, self.cfg.image_size, generator=generator)
        for step in reversed(range(self.cfg.timesteps)):
            t = torch.full((len(cond),), step, dtype=torch.long)
            eps = self(x, t, cond)
            x = (x - betas[step] / (1 - abar[step]).sqrt() * eps) / (1 - betas[step]).sqrt()
            if step > 0:
                x = x + betas[step].sqrt() * torch.randn(x.shape, generator=generator)
        return x.clamp(-1, 1)


def ddpm_loss(model: ConditionalUNet, x0: Tensor, cond: Tensor, t: Tensor | None = None, noise: Tensor | None = None,
              generator: torch.Generator | None = None) -> Tensor:
    """|| eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, cond) ||^2, averaged (DDPM Eq. 14)."""
    if t is None:
        t = torch.randint(0, model.cfg.timesteps, (len(x0),), generator=generator).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    return F.mse_loss(model(q_sample(x0, t, noise, model.alphas_cumprod), t, cond), noise)


def save_diffusion(model: ConditionalUNet, directory: str | Path, metadata: dict | None = None) -> Path:
    """``directory/diffusion.json`` (config and metadata) and ``directory/diffusion.safetensors``."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diffusion.json").write_text(json.dumps({"config": asdict(model.cfg), "metadata": metadata or {}}, indent=2))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "diffusion.safetensors"))
    return out


def load_diffusion(directory: str | Path) -> tuple[ConditionalUNet, dict]:
    """The model :func:`save_diffusion` wrote, in eval mode, and its metadata."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / "diffusion.json").is_file() or not (d / "diffusion.safetensors").is_file():
        raise ConfigError(f"{d} is not a diffusion model directory (no diffusion.json and diffusion.safetensors); "
                          "create one with `clipforge train-diffusion MODEL --out DIR`")
    info = json.loads((d / "diffusion.json").read_text())
    model = ConditionalUNet(DiffusionConfig(**info["config"]))
    model.load_state_dict(load_file(str(d / "diffusion.safetensors")))
    return model.eval(), info.get("metadata", {})


__all__ = ["ConditionalUNet", "DiffusionConfig", "ddpm_loss", "linear_betas", "load_diffusion", "q_sample",
           "save_diffusion", "timestep_embedding"]
