"""Text Transformer tower (CLIP's GPT-style encoder).

token embedding + positional embedding -> causal pre-LN blocks -> ln_final -> pooling at
the end-of-text token -> projection. With the causal mask, the end-of-text position never
sees the padding after it, so padding (any context length) does not change an embedding.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import TextConfig
from .transformer import Transformer


class TextTransformer(nn.Module):
    """The text tower (module docstring). With w = ``cfg.width`` and L <= ``cfg.context_length``:

    - ``forward(ids [B, L]) -> [B, output_dim]`` (integer token ids), not normalized (:class:`CLIP` normalizes);
    - ``forward_tokens(ids [B, L], embeddings [B, L, w] | None) -> [B, L, w]`` after ``ln_final``;
    - ``pool(tokens [B, L, w], ids [B, L]) -> [B, w]`` (the end-of-text state by default);
      ``eot_index(ids) -> [B]``; ``project(x [..., w]) -> [..., output_dim]``.
    """

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
        if self.cfg.causal:
            x = self.transformer(x, is_causal=True)
        elif self.cfg.pad_mask:  # bidirectional: mask the padding keys instead
            keep = (ids != self.cfg.pad_token_id)[:, None, None, :]
            x = self.transformer(x, attn_mask=keep)
        else:  # bidirectional over every position, padding included (SigLIP)
            x = self.transformer(x)
        return self.ln_final(x)

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

    def forward(self, ids: Tensor, embeddings: Tensor | None = None) -> Tensor:
        return self.project(self.pool(self.forward_tokens(ids, embeddings), ids))
