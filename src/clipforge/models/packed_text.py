"""Packed (unpadded) text inference: every linear layer of the text tower runs on real tokens only.

The text tower without gradients already runs each text only up to its end-of-text token
(:mod:`clipforge.models.text`): a batch is cut at its longest text, a large batch is sorted by length
and cut per bucket of ``BUCKET_ROWS`` texts. Each bucket still pads its shorter texts to its longest,
and every linear layer (more than 98% of a text's FLOPs at CLIP's widths: 24 w^2 per token and layer
against 4 n w for attention) runs on those padding rows too. A batch of 32 captions of 5 to 37 tokens
is cut at 37 while its texts average 17 tokens: more than half the work is padding.

:class:`PackedTextTransformer` (what :meth:`CLIP.to_inference` makes of a plain causal text tower)
lays the batch out as one [T, width] matrix of its T real tokens, text after text in length order,
so the LayerNorms, the linear layers, the GELU and the residual adds see no padding at all, in one
GEMM per layer for up to :data:`PACK_ROWS` tokens (a larger batch runs in groups of texts that fill
it). Only attention needs the texts apart: per bucket of
``BUCKET_ROWS`` texts the q, k, v rows are gathered into a [texts, n, 3 width] block cut at the
bucket's longest text, run through ``F.scaled_dot_product_attention`` with the causal mask, and the
real rows gathered back. A position after a text's end (in the block only) repeats the text's last
token, which no real position attends to under the causal mask, so it cannot change a result.

Each text's embedding equals the padded pass's up to floating-point summation order
(``tests/models/test_packed_text.py`` checks it in float64). The state dict is unchanged: the packed
tower is the same module with another class (:func:`pack_text_towers`; :func:`unpack_text_towers`
undoes it), in the way ``torch.nn.utils.parametrize`` swaps a module's class. The packed layout is
this module's own code because PyTorch has no causal variable-length attention for the CPU: SDPA on
jagged nested tensors refuses ``is_causal`` (torch 2.13: "Nested tensors for query / key are not
supported when is_causal=True").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .text import BUCKET_ROWS, TextTransformer
from .transformer import Attention, Block

# Tokens per packed group. The linear layers' rate is flat in the row count up to about 2,200 rows and then falls
# for fp32 where an output outgrows the cache: oneDNN's fp32 GELU layer of ViT-B-32's text MLP (512 -> 2048) ran
# at 383-408 GFLOP/s from 300 to 2,200 rows and at 268 at 4,368 (a batch of 256 captions) on a 2-core Zen 5 EPYC
# (`python benchmarks/bench_peak.py --shapes packed-rows`, docs/performance.md "Packed text inference"); the other
# layers, and every bf16 layer, stayed flat.
PACK_ROWS = 2048


class PackedTextTransformer(TextTransformer):
    """A :class:`TextTransformer` whose gradient-free, trimmed forward runs packed (module docstring).
    Made by :func:`pack_text_towers` from a plain causal tower; everything else is its parent's."""

    def forward_trimmed(self, ids: Tensor, embeddings: Tensor | None = None) -> Tensor:
        bad = ids.shape[1] > self.cfg.context_length or (
            embeddings is not None and embeddings.shape != (*ids.shape, self.cfg.width))
        if bad or ids.shape[0] == 1:  # bad shapes get the parent's error messages, which say how to fix them
            return super().forward_trimmed(ids, embeddings)
        lengths = self.eot_index(ids) + 1
        if bool(lengths.min() == lengths.max()):  # one cut has no padding
            return super().forward_trimmed(ids, embeddings)
        return packed_forward(self, ids, lengths, embeddings)


def packed_forward(tower: TextTransformer, ids: Tensor, lengths: Tensor, embeddings: Tensor | None) -> Tensor:
    """The pooled, projected features [B, output_dim] of ``ids`` [B, L] whose texts end at ``lengths`` - 1,
    computed on the real tokens only (module docstring), in groups of at most :data:`PACK_ROWS` tokens."""
    order = torch.argsort(lengths, descending=True, stable=True)
    ids, lengths = ids[order], lengths[order]
    embeddings = embeddings[order] if embeddings is not None else None
    parts = [_packed_group(tower, ids[a:b], lengths[a:b], embeddings[a:b] if embeddings is not None else None)
             for a, b in _groups(lengths.tolist(), PACK_ROWS)]
    pooled = torch.cat(parts) if len(parts) > 1 else parts[0]
    out = torch.empty_like(pooled)
    out[order] = pooled
    return out


def _groups(lengths: list[int], rows: int) -> list[tuple[int, int]]:
    """Consecutive spans [a, b) of texts holding at most ``rows`` tokens together (one text at least)."""
    spans, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if total + n > rows and i > start:
            spans.append((start, i))
            start, total = i, 0
        total += n
    spans.append((start, len(lengths)))
    return spans


def _packed_group(tower: TextTransformer, ids: Tensor, lengths: Tensor, embeddings: Tensor | None) -> Tensor:
    """:func:`packed_forward` of texts already in descending order of length, packed as one [T, width] matrix."""
    n_max = int(lengths[0])
    positions = torch.arange(n_max, device=ids.device)
    real = positions < lengths[:, None]  # [B, n_max], text-major: the packed rows in order
    x = tower.token_embedding(ids[:, :n_max][real]) if embeddings is None else embeddings[:, :n_max][real]
    x = x + tower.positional_embedding[:n_max].to(x.dtype)[positions.expand_as(real)[real]]
    ends = torch.cumsum(lengths, 0)  # the row after each text's last token
    buckets = _attention_buckets(lengths, ends - lengths)
    for block in tower.transformer.blocks:
        x = x + _packed_attention(block.attn, block.ln_1(x), buckets)
        x = x + block.mlp(block.ln_2(x))
    return tower.project(tower.ln_final(x[ends - 1]))


def _attention_buckets(lengths: Tensor, starts: Tensor) -> list[tuple[int, int, Tensor, Tensor]]:
    """Per bucket of ``BUCKET_ROWS`` consecutive texts (lengths in descending order, packed rows from
    ``starts``): (texts, n, gather [texts * n], back [its real rows]). ``gather`` picks each block position's
    packed row (a position past a text's end repeats its last token); ``back`` picks the real positions of the
    [texts * n] block, which in order are the bucket's packed rows."""
    out = []
    for first in range(0, lengths.shape[0], BUCKET_ROWS):
        ls, ss = lengths[first : first + BUCKET_ROWS], starts[first : first + BUCKET_ROWS]
        n = int(ls[0])
        p = torch.arange(n, device=ls.device)
        gather = (ss[:, None] + torch.minimum(p, ls[:, None] - 1)).reshape(-1)
        back = ((torch.arange(ls.shape[0], device=ls.device) * n)[:, None] + p)[p < ls[:, None]]
        out.append((ls.shape[0], n, gather, back))
    return out


def _packed_attention(attn: Attention, x: Tensor, buckets: list[tuple[int, int, Tensor, Tensor]]) -> Tensor:
    """``attn``'s causal self-attention of packed rows ``x`` [T, C], each text attending to its own tokens."""
    c = x.shape[-1]
    d = c // attn.heads
    qkv = attn.in_proj(x)  # [T, 3C]: one GEMM for every text of the batch
    parts = []
    for texts, n, gather, back in buckets:
        q, k, v = qkv[gather].view(texts, n, 3, attn.heads, d).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [texts, heads, n, d]
        parts.append(o.transpose(1, 2).reshape(texts * n, c)[back])
    return attn.out_proj(torch.cat(parts) if len(parts) > 1 else parts[0])


def packable(tower: nn.Module) -> bool:
    """Whether :func:`pack_text_towers` can pack ``tower``: a plain :class:`TextTransformer` (not a subclass
    with its own forward) that trims (causal, pooled at the end-of-text token) and whose blocks are plain
    :class:`Block` s with plain :class:`Attention`."""
    return (type(tower) is TextTransformer and tower.trim_padding and tower.cfg.causal and tower.cfg.pool == "eot"
            and all(type(b) is Block and type(b.attn) is Attention for b in tower.transformer.blocks))


def pack_text_towers(model: nn.Module) -> int:
    """Make every packable text tower of ``model`` (:func:`packable`) a :class:`PackedTextTransformer`, in
    place; returns how many. Parameters, buffers and the state dict are untouched."""
    towers = [m for m in model.modules() if packable(m)]
    for tower in towers:
        tower.__class__ = PackedTextTransformer
    return len(towers)


def unpack_text_towers(model: nn.Module) -> int:
    """Undo :func:`pack_text_towers` in place (for comparing the two paths); returns how many towers changed."""
    towers = [m for m in model.modules() if type(m) is PackedTextTransformer]
    for tower in towers:
        tower.__class__ = TextTransformer
    return len(towers)
