"""A pretrained Hugging Face encoder (BERT family) as CLIP's text tower.

LiT (Zhai et al., 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning") shows that
a pretrained, locked tower plus a trained partner aligns quickly; here the locked tower is
the text side, as in ProCLIP/LLM2CLIP-style setups that put a language model's embedder in
CLIP. The embedding of a text is

    t = P^T pool(H),   H = encoder(ids, attention_mask = ids != pad)

with ``pool`` the mean of the non-padding states (sentence-transformers' mean pooling) or
the first ([CLS]) state, and P a trained [hidden, embed_dim] projection. ``lock=True``
freezes the encoder (kept in eval mode, so no dropout), ``unlocked_layers=N`` trains the
last N encoder layers, and ``lock=False`` trains everything.

transformers is imported only when such a tower is built (an optional dependency).
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .config import HFTextConfig


def _layer_index(name: str) -> int | None:
    m = re.search(r"(?:^|\.)layers?\.(\d+)\.", name)
    return int(m.group(1)) if m else None


class HFTextTower(nn.Module):
    def __init__(self, cfg: HFTextConfig, output_dim: int):
        super().__init__()
        try:
            from transformers import AutoConfig, AutoModel
        except ImportError as e:  # pragma: no cover - transformers is in the dev/minilm extras
            raise ImportError("a Hugging Face text tower needs transformers: pip install 'clipforge[minilm]'") from e
        self.cfg = cfg
        if cfg.pretrained:
            self.encoder = AutoModel.from_pretrained(cfg.path, add_pooling_layer=False)
        else:
            self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(cfg.path), add_pooling_layer=False)
        hidden = self.encoder.config.hidden_size
        self.pad_token_id = self.encoder.config.pad_token_id if self.encoder.config.pad_token_id is not None else 0
        self.proj = nn.Parameter(torch.randn(hidden, output_dim) * hidden**-0.5)
        self._apply_lock()

    def _apply_lock(self) -> None:
        if not self.cfg.lock:
            return
        n_layers = self.encoder.config.num_hidden_layers
        if self.cfg.unlocked_layers > n_layers:
            raise ValueError(f"unlocked_layers={self.cfg.unlocked_layers} but the encoder has {n_layers} layers")
        first_trained = n_layers - self.cfg.unlocked_layers
        for name, p in self.encoder.named_parameters():
            idx = _layer_index(name)
            p.requires_grad_(idx is not None and idx >= first_trained)

    @property
    def fully_locked(self) -> bool:
        return self.cfg.lock and self.cfg.unlocked_layers == 0

    def train(self, mode: bool = True):
        super().train(mode)
        if self.fully_locked:  # a frozen encoder stays deterministic (no dropout)
            self.encoder.eval()
        return self

    def pooled(self, ids: Tensor) -> Tensor:
        """The pooled encoder states [B, hidden], before the projection."""
        if ids.ndim != 2:
            raise ValueError(f"expected token ids of shape [B, L], got {tuple(ids.shape)}")
        mask = (ids != self.pad_token_id).long()
        mask[:, 0] = 1  # the [CLS] position always attends, even for an all-padding row
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.fully_locked):
            states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.cfg.pool == "cls":
            pooled = states[:, 0]
        else:
            m = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return pooled

    def forward(self, ids: Tensor) -> Tensor:
        return self.pooled(ids) @ self.proj
