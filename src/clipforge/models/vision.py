"""Vision Transformer image tower (Dosovitskiy et al., 2021, as used by CLIP).

patches -> linear patch embedding (a strided convolution) -> [class token; patches] +
positional embedding -> ln_pre -> pre-LN blocks -> ln_post -> pooling -> projection.
Pooling is the class token (CLIP), the mean of patch tokens, or attention pooling with a
learned query (as in SigLIP's MAP head).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import VisionConfig
from .transformer import Transformer


class AttentionPool(nn.Module):
    """Multi-head attention pooling with one learned query over all tokens."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        q = self.query.expand(x.shape[0], -1, -1)
        return self.ln(self.attn(q, x, x, need_weights=False)[0][:, 0])


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim: int):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = w**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + 1, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.ln_eps) if cfg.ln_pre else nn.Identity()
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps)
        self.ln_post = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.attn_pool = AttentionPool(w, cfg.attn_pool_heads) if cfg.pool == "attn" else None
        self.proj = nn.Parameter(scale * torch.randn(w, output_dim))
        self.transformer.init_weights()

    def forward_tokens(self, pixels: Tensor) -> Tensor:
        """All tokens after ln_post: [B, 1 + grid^2, width] (class token first)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(pixels.shape)}")
        if pixels.shape[-1] != self.cfg.image_size or pixels.shape[-2] != self.cfg.image_size:
            raise ValueError(
                f"expected {self.cfg.image_size}x{self.cfg.image_size} images, got {pixels.shape[-2]}x{pixels.shape[-1]}; "
                "preprocess them with clipforge.image_transform(model.image_size)"
            )
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # [B, N, w]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)

    def pool(self, tokens: Tensor) -> Tensor:
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        if self.cfg.pool == "mean":
            return tokens[:, 1:].mean(dim=1)
        return self.attn_pool(tokens)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.pool(self.forward_tokens(pixels)) @ self.proj
