"""Text Transformer tower (CLIP's GPT-style encoder).

token embedding + positional embedding -> causal pre-LN blocks -> ln_final -> pooling at
the end-of-text token -> projection. With the causal mask, the end-of-text position never
sees the padding after it, so padding (any context length) does not change an embedding.

That is also what makes inference fast (:meth:`TextTransformer.forward` without gradients):
the states after a text's end-of-text token are never read, so the tower runs each text only
up to its end-of-text token. A batch is cut at its longest text instead of the context length
(77 for CLIP, where real captions take 10-30 tokens), and a large batch of mixed lengths is
sorted by length and run in chunks of ``BUCKET_ROWS`` texts, each cut at its own longest text,
then put back in order. Each text's embedding is the same as with the full padded batch up to
floating-point summation order (tests/models/test_inference.py checks it in float64).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import TextConfig
from .transformer import Transformer

BUCKET_ROWS = 32  # texts per length bucket at inference: still hundreds of GEMM rows at caption lengths



class TextTransformer(nn.Module):
    """The text tower (module docstring). With w = ``cfg.width`` and L <= ``cfg.context_length``:

    - ``forward(ids [B, L]) -> [B, output_dim]`` (integer token ids), not normalized (:class:`CLIP` normalizes);
    - ``forward_tokens(ids [B, L], embeddings [B, L, w] | None) -> [B, L, w]`` after ``ln_final``;
    - ``pool(tokens [B, L, w], ids [B, L]) -> [B, w]`` (the end-of-text state by default);
      ``eot_index(ids) -> [B]``; ``project(x [..., w]) -> [..., output_dim]``.
    """

    # inference (no gradients) runs each text only up to its end-of-text token (module docstring);
    # a subclass or a wrapper that reads the padding positions' states (MoE routing) turns it off
    trim_padding: bool = True

    def __init__(self, cfg: TextConfig, output_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.proj = nn.Parameter(torch.empty(cfg.width, output_dim))
        self.proj_bias = nn.Parameter(torch.zeros(output_dim)) if cfg.proj_bias else None
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.proj, std=cfg.width**-0.5)
        self.transformer.init_weights()

    def forward_tokens(self, ids: Tensor, embeddings: Tensor | None = None) -> Tensor:
        """All token states after ln_final: [B, L, width].

        ``embeddings`` [B, L, width], when given, replaces the token-embedding lookup
        ``token_embedding(ids)`` (positional embeddings are still added); ``ids`` then only
        locate the end-of-text token and the padding. This is the seam prompt learning (CoOp)
        uses to put learned vectors where template words were."""
        if ids.ndim != 2:
            raise ValueError(f"expected token ids of shape [B, L], got {tuple(ids.shape)}")
        n = ids.shape[1]
        if n > self.cfg.context_length:
            raise ValueError(
                f"token sequence of length {n} exceeds the model's context length {self.cfg.context_length}; "
                f"tokenize with context_length={self.cfg.context_length}"
            )
        if embeddings is None:
            embeddings = self.token_embedding(ids)
        elif embeddings.shape != (*ids.shape, self.cfg.width):
            raise ValueError(f"token embeddings of shape {tuple(embeddings.shape)} do not match ids {tuple(ids.shape)} "
                             f"and width {self.cfg.width}")
        x = embeddings + self.positional_embedding[:n].to(embeddings.dtype)
        return self.ln_final(self.transformer(x, **self._attention_args(ids)))

    def _attention_args(self, ids: Tensor) -> dict:
        if self.cfg.causal:
            return {"is_causal": True}
        if self.cfg.pad_mask:  # bidirectional: mask the padding keys instead
            return {"attn_mask": (ids != self.cfg.pad_token_id)[:, None, None, :]}
        return {}  # bidirectional over every position, padding included (SigLIP)

    def forward_tokens_with_attention(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(:meth:`forward_tokens` of ``ids`` [B, L] -> [B, L, width], the last block's attention probabilities
        [B, heads, L, L]): the last block runs with its attention written out
        (:meth:`~clipforge.models.transformer.Block.forward_with_weights`), so gradients can be taken with respect
        to the attention maps (GA-DMS's gradient-attention score)."""
        if ids.ndim != 2 or ids.shape[1] > self.cfg.context_length:
            raise ValueError(f"expected token ids [B, L] with L <= {self.cfg.context_length}, got {tuple(ids.shape)}")
        x = self.token_embedding(ids)
        x = x + self.positional_embedding[: ids.shape[1]].to(x.dtype)
        args = self._attention_args(ids)
        for block in self.transformer.blocks[:-1]:
            x = block(x, **args)
        x, weights = self.transformer.blocks[-1].forward_with_weights(x, **args)
        return self.ln_final(x), weights

    def eot_index(self, ids: Tensor) -> Tensor:
        """Position of the first end-of-text token (last position when the text has none)."""
        is_eot = ids == self.cfg.eot_token_id
        first = is_eot.int().argmax(dim=1)
        return torch.where(is_eot.any(dim=1), first, torch.full_like(first, ids.shape[1] - 1))

    def pool(self, tokens: Tensor, ids: Tensor) -> Tensor:
        if self.cfg.pool == "eot":
            return tokens[torch.arange(tokens.shape[0], device=tokens.device), self.eot_index(ids)]
        if self.cfg.pool == "first":
            return tokens[:, 0]
        if self.cfg.pool == "last":
            return tokens[:, -1]
        mask = (ids != self.cfg.pad_token_id).unsqueeze(-1).to(tokens.dtype)
        return (tokens * mask).sum(1) / mask.sum(1).clamp_min(1)

    def project(self, x: Tensor) -> Tensor:
        """The output projection (with SigLIP's bias), for pooled states or every token's state."""
        x = x @ self.proj
        return x + self.proj_bias if self.proj_bias is not None else x

    def trims(self, ids: Tensor) -> bool:
        """Whether :meth:`forward` runs ``ids`` on the trimmed path: no gradients, a causal tower
        pooled at the end-of-text token, ``trim_padding`` on, integer ids [B, L], and not being traced
        (an exported graph must take any batch, so it keeps the full padded pass)."""
        return (self.trim_padding and not torch.is_grad_enabled() and self.cfg.causal and self.cfg.pool == "eot"
                and ids.ndim == 2 and ids.shape[1] > 0 and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling())

    def forward(self, ids: Tensor, embeddings: Tensor | None = None) -> Tensor:
        if self.trims(ids):
            return self.forward_trimmed(ids, embeddings)
        return self.project(self.pool(self.forward_tokens(ids, embeddings), ids))

    def forward_trimmed(self, ids: Tensor, embeddings: Tensor | None = None) -> Tensor:
        """:meth:`forward` with each text run only up to its end-of-text token (module docstring):
        one pass cut at the longest text for up to ``2 * BUCKET_ROWS`` texts, else length buckets."""
        lengths = self.eot_index(ids) + 1  # [B]; the pooled state is at lengths - 1
        b = ids.shape[0]
        if b < 2 * BUCKET_ROWS:
            n = int(lengths.max())
            return self._run_cut(ids, embeddings, n)
        order = torch.argsort(lengths, descending=True, stable=True)
        out = None
        for start in range(0, b, BUCKET_ROWS):
            rows = order[start : start + BUCKET_ROWS]
            n = int(lengths[rows[0]])
            part = self._run_cut(ids[rows], embeddings[rows] if embeddings is not None else None, n)
            if out is None:
                out = part.new_empty(b, part.shape[1])
            out[rows] = part
        return out

    def _run_cut(self, ids: Tensor, embeddings: Tensor | None, n: int) -> Tensor:
        ids = ids[:, :n]
        embeddings = embeddings[:, :n] if embeddings is not None else None
        return self.project(self.pool(self.forward_tokens(ids, embeddings), ids))
