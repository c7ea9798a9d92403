"""The pre-LayerNorm transformer shared by both towers.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` so that the
fused CPU/CUDA kernels (flash / memory-efficient) are used; q, k, v come from one fused
linear layer, which is also the layout of OpenAI/OpenCLIP checkpoints (``in_proj``).

On CPU, sequences of up to ``MATH_ATTENTION_MAX_LEN`` tokens train fastest with SDPA's math
backend: its backward is plain batched matmuls, while the CPU flash kernel's backward is
several times slower at these lengths and small head sizes (measured with
benchmarks/bench_train_throughput.py; see docs/performance.md). Longer sequences keep the
flash kernel, whose memory does not grow with N^2.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

MATH_ATTENTION_MAX_LEN = 256


def _attention_context(x: Tensor):
    if x.device.type == "cpu" and x.shape[1] <= MATH_ATTENTION_MAX_LEN and torch.is_grad_enabled():
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of the original OpenAI CLIP weights."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu_tanh":  # the tanh approximation of GELU (SigLIP's gelu_pytorch_tanh)
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unknown activation '{name}'; use 'gelu', 'quick_gelu' or 'gelu_tanh'")


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, c = x.shape
        qkv = self.in_proj(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        with _attention_context(x):
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask, is_causal=is_causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, ln_eps: float = 1e-5):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), make_act(act), nn.Linear(hidden, width))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu", ln_eps: float = 1e-5):
        super().__init__()
        self.width, self.layers = width, layers
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, act, ln_eps) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        return x

    def init_weights(self) -> None:
        """OpenAI CLIP's initialization: std width^-0.5 for attention inputs, scaled by depth for outputs."""
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.in_proj.weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj.bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp[0].weight, std=fc_std)
            nn.init.zeros_(block.mlp[0].bias)
            nn.init.normal_(block.mlp[2].weight, std=proj_std)
            nn.init.zeros_(block.mlp[2].bias)
