"""The pre-LayerNorm transformer shared by both towers.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` so that the
fused CPU/CUDA kernels (flash / memory-efficient) are used; q, k, v come from one fused
linear layer, which is also the layout of OpenAI/OpenCLIP checkpoints (``in_proj``).

On CPU, sequences of up to ``MATH_ATTENTION_MAX_LEN`` tokens train fastest with SDPA's math
backend: its backward is plain batched matmuls, while the CPU flash kernel's backward is
several times slower at these lengths and small head sizes (measured with
benchmarks/bench_train_throughput.py; see docs/performance.md). Longer sequences keep the
flash kernel, whose memory does not grow with N^2.

For those short sequences without a padding mask (every ViT block, the causal text tower)
clipforge does not even go through SDPA's math backend but through :func:`short_attention`,
the same math written for the CPU: SDPA's composite math path indexes q/k/v out of the
fused projection as strided views, so every batched matmul of its forward and backward
first copies them to contiguous memory, its "safe softmax" scans every row for -inf and
the causal mask is rebuilt each call. The profile of a bf16 ``tiny`` step had those copies
as the largest single item (27% of the step). ``short_attention`` makes one copy of the
projection into head-major layout, folds the 1/sqrt(d) scale and the cached causal mask
into one ``baddbmm``, and leaves the other layouts to ``bmm``'s transposed-operand support.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

MATH_ATTENTION_MAX_LEN = 256


def attention_context(x: Tensor):
    """The attention kernel for ``x`` [B, N, D]: PyTorch's math SDPA on CPU for sequences of at most
    ``MATH_ATTENTION_MAX_LEN`` tokens while gradients are on (faster there than the fused kernels),
    the default dispatch otherwise."""
    if x.device.type == "cpu" and x.shape[1] <= MATH_ATTENTION_MAX_LEN and torch.is_grad_enabled():
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


_CAUSAL_MASKS: dict[tuple, Tensor] = {}


def _causal_additive_mask(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[n, n] with -inf above the diagonal, 0 elsewhere; cached per (n, dtype, device) since
    every causal block of every step uses the same one."""
    key = (n, dtype, device)
    mask = _CAUSAL_MASKS.get(key)
    if mask is None:
        mask = torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu_(1)
        _CAUSAL_MASKS[key] = mask
    return mask


def use_short_attention(x: Tensor, attn_mask: Tensor | None) -> bool:
    """Whether :func:`short_attention` runs: CPU, training, at most MATH_ATTENTION_MAX_LEN
    tokens, no padding mask (a fully masked row needs SDPA's safe softmax)."""
    return (attn_mask is None and x.device.type == "cpu" and x.shape[1] <= MATH_ATTENTION_MAX_LEN
            and torch.is_grad_enabled())


def short_attention(qkv: Tensor, heads: int, is_causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d) [+ causal mask]) v from the fused projection ``qkv`` [B, N, 3C]
    to [B, N, C]: the result of ``F.scaled_dot_product_attention`` (equal up to rounding;
    tests/models/test_models.py checks values and gradients), with fewer copies on CPU."""
    b, n, c3 = qkv.shape
    c = c3 // 3
    d = c // heads
    # one copy into [3, B*H, N, d]; q, k, v are then contiguous batched matrices
    q, k, v = qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4).reshape(3, b * heads, n, d).unbind(0)
    kt = k.transpose(1, 2)  # bmm reads the transposed operand in place
    if is_causal:
        scores = torch.baddbmm(_causal_additive_mask(n, q.dtype, q.device), q, kt, alpha=d**-0.5)
    else:
        scores = torch.bmm(q, kt).mul_(d**-0.5)  # bmm's backward needs q and k, not its output
    out = torch.bmm(torch.softmax(scores, dim=-1), v)  # [B*H, N, d]
    return out.view(b, heads, n, d).transpose(1, 2).reshape(b, n, c)


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
    """Multi-head self-attention with a fused input projection: ``forward(x [B, N, C]) -> [B, N, C]``
    with C = width split into ``heads`` heads of C / heads; ``in_proj`` maps C -> 3C (q, k, v),
    ``out_proj`` C -> C. ``attn_mask``: a boolean [B, 1, 1, N] (True = attend; the text tower's
    padding mask) or anything ``F.scaled_dot_product_attention`` accepts; ``is_causal`` masks the
    future (the causal text tower)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, c = x.shape
        if use_short_attention(x, attn_mask):
            return self.out_proj(short_attention(self.in_proj(x), self.heads, is_causal))
        qkv = self.in_proj(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        with attention_context(x):
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask, is_causal=is_causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))

    def forward_with_weights(self, x: Tensor, attn_mask: Tensor | None = None,
                             is_causal: bool = False) -> tuple[Tensor, Tensor]:
        """:meth:`forward`'s output with the attention probabilities [B, heads, N, N] it used (row = query),
        written out so that the probabilities are a node of the autograd graph: gradients of anything computed
        from the output can be taken with respect to them (GA-DMS's gradient-attention score). Same
        ``attn_mask`` (boolean, True = attend) and ``is_causal`` as :meth:`forward`; slower, for analysis."""
        b, n, c = x.shape
        q, k, v = self.in_proj(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5
        if is_causal:
            scores = scores + _causal_additive_mask(n, scores.dtype, scores.device)
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise ValueError("forward_with_weights takes a boolean attn_mask (True = attend)")
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        weights = scores.softmax(-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, n, c)), weights


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

    def forward_with_weights(self, x: Tensor, attn_mask: Tensor | None = None,
                             is_causal: bool = False) -> tuple[Tensor, Tensor]:
        """:meth:`forward` and the attention probabilities [B, heads, N, N] (:meth:`Attention.forward_with_weights`)."""
        out, weights = self.attn.forward_with_weights(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + out
        return x + self.mlp(self.ln_2(x)), weights


class Transformer(nn.Module):
    """``layers`` pre-LN :class:`Block` s of one width: ``forward(x [B, N, width]) -> [B, N, width]``,
    with the same ``attn_mask`` / ``is_causal`` for every block; ``grad_checkpointing`` recomputes
    each block's activations in backward."""

    def __init__(
        self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu", ln_eps: float = 1e-5
    ):
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
