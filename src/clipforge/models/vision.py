"""Vision Transformer image tower (Dosovitskiy et al., 2021, as used by CLIP).

patches -> linear patch embedding (a strided convolution) -> [class token; patches] +
positional embedding -> ln_pre -> pre-LN blocks -> ln_post -> pooling -> projection.
Pooling is the class token (CLIP), the mean of patch tokens, attention pooling with a
learned query, or SigLIP's MAP head (Zhai et al., 2023: multi-head attention pooling
followed by a residual MLP). SigLIP towers also drop the class token, put a bias on the
patch embedding and skip the final projection (``VisionConfig.class_token``, ``patch_bias``,
``proj``).

The patch embedding is stored as the usual strided ``Conv2d`` (the layout of OpenAI,
OpenCLIP and Hugging Face weights) but computed as what it is, a linear layer over
non-overlapping patches (:meth:`VisionTransformer.embed_patches`): one reshape of the
pixels, then one GEMM with the conv weight viewed as [width, 3*p*p]. On CPU the oneDNN
convolution, and above all its backward, is slower than that GEMM at these shapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VisionConfig
from .transformer import Transformer, make_act


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


class MAPHead(nn.Module):
    """SigLIP's multi-head attention pooling: y = MHA(probe, x, x); out = y + MLP(LN(y))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, ln_eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln = nn.LayerNorm(width, eps=ln_eps)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), make_act(act), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        y = self.attn(self.probe.expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]
        return (y + self.mlp(self.ln(y)))[:, 0]


class VisionTransformer(nn.Module):
    """The ViT image tower (module docstring). With w = ``cfg.width``, g = image_size / patch_size
    and P = 1 with a class token, else 0:

    - ``forward(pixels [B, 3, S, S]) -> [B, output_dim]`` (``[B, w]`` when ``cfg.proj`` is False),
      not normalized (:class:`CLIP` normalizes);
    - ``forward_tokens(pixels) -> [B, P + g^2, w]`` after ``ln_post``;
      ``embed_patches(pixels) -> [B, g^2, w]``;
    - ``pool(tokens [B, P + g^2, w]) -> [B, w]``; ``project(x [..., w]) -> [..., output_dim]``.

    ``S`` must equal ``cfg.image_size`` (a clear error otherwise).
    """

    def __init__(self, cfg: VisionConfig, output_dim: int):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        scale = w**-0.5
        self.num_prefix = 1 if cfg.class_token else 0
        self.class_embedding = nn.Parameter(scale * torch.randn(w)) if cfg.class_token else None
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid**2 + self.num_prefix, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.ln_eps) if cfg.ln_pre else nn.Identity()
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps)
        self.ln_post = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.attn_pool = AttentionPool(w, cfg.attn_pool_heads) if cfg.pool == "attn" else None
        if cfg.pool == "map":
            self.attn_pool = MAPHead(w, cfg.attn_pool_heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps)
        if not cfg.proj and w != output_dim:
            raise ValueError(f"vision proj=False needs width == embed_dim, got width {w} and embed_dim {output_dim}")
        self.proj = nn.Parameter(scale * torch.randn(w, output_dim)) if cfg.proj else None
        self.transformer.init_weights()

    def forward_tokens(self, pixels: Tensor) -> Tensor:
        """All tokens after ln_post: [B, num_prefix + grid^2, width] (class token first, if any)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(pixels.shape)}")
        if pixels.shape[-1] != self.cfg.image_size or pixels.shape[-2] != self.cfg.image_size:
            raise ValueError(
                f"expected {self.cfg.image_size}x{self.cfg.image_size} images, got "
                f"{pixels.shape[-2]}x{pixels.shape[-1]}; "
                "preprocess them with clipforge.image_transform(model.image_size)"
            )
        x = self.embed_patches(pixels)  # [B, N, w]
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)

    def embed_patches(self, pixels: Tensor) -> Tensor:
        """``patch_embed(pixels).flatten(2).transpose(1, 2)`` ([B, grid^2, width], row-major
        patches) computed as patches @ W^T: equal to the convolution up to summation order."""
        b, g, p = pixels.shape[0], self.grid, self.cfg.patch_size
        patches = pixels.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
        weight = self.patch_embed.weight.reshape(self.patch_embed.out_channels, -1)  # (c, kh, kw) order, as in patches
        return F.linear(patches, weight, self.patch_embed.bias)

    def pool(self, tokens: Tensor) -> Tensor:
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        if self.cfg.pool == "mean":
            return tokens[:, self.num_prefix :].mean(dim=1)
        return self.attn_pool(tokens)

    def project(self, x: Tensor) -> Tensor:
        """The output projection (none for SigLIP towers), for pooled features or patch tokens."""
        return x @ self.proj if self.proj is not None else x

    def forward(self, pixels: Tensor) -> Tensor:
        return self.project(self.pool(self.forward_tokens(pixels)))
