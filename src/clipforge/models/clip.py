"""The CLIP dual encoder: an image tower and a text tower projected into one space.

``forward(images, texts)`` returns a dict with normalized ``image_features`` and
``text_features``, the exponentiated ``logit_scale`` (clamped at ``max_logit_scale``) and
``logit_bias`` (None unless the config sets ``init_logit_bias``, as SigLIP does). With
``return_tokens=True`` it also returns the projected token features that token-level loss
terms read (Norton, DreamLIP's grouping): ``image_tokens`` [B, N, d] (the patch tokens, class
token left out), ``text_tokens`` [B, L, d] and ``text_mask`` [B, L], from the same tower passes
as the pooled features (:meth:`CLIP.encode_image_tokens`, :meth:`CLIP.encode_text_tokens`).

:meth:`CLIP.to_inference` prepares a model for embedding only: evaluation mode, no gradients,
weights stored once in the inference dtype (bf16 halves the bytes every GEMM reads and uses the
CPU's bf16 dot-product instructions, with no autocast cast per call), inputs cast to that dtype
and embeddings returned in float32 (normalized in float32) for bf16/fp16 weights. Such a model
refuses ``train()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .compile import call_compiled
from .config import CLIPConfig
from .hf_text import HFTextTower
from .region_head import RegionHead
from .text import TextTransformer
from .vision import VisionTransformer


class CLIP(nn.Module):
    """The dual encoder (Radford et al., 2021): ``visual`` (a :class:`VisionTransformer`), ``text``
    (a :class:`TextTransformer`, or a Hugging Face encoder when ``cfg.hf_text`` is set), the
    learned log temperature ``logit_scale`` (a scalar) and, for SigLIP, the scalar ``logit_bias``.

    Shapes, with d = ``cfg.embed_dim``, S = ``cfg.vision.image_size``, L <= ``context_length``:

    - ``encode_image(images [B, 3, S, S]) -> [B, d]``, L2-normalized unless ``normalize=False``;
    - ``encode_text(ids [B, L]) -> [B, d]`` (integer token ids, padded with ``cfg.text.pad_token_id``),
      same normalization;
    - ``encode_image_tokens(images) -> ([B, d], [B, N, d])`` with N = (S / patch_size)^2 patches;
    - ``encode_text_tokens(ids) -> ([B, d], [B, L, d], mask [B, L] bool)``;
    - ``forward(images, texts)`` -> dict of ``image_features`` [B, d], ``text_features`` [B', d],
      ``logit_scale`` [] (exp of the parameter, clamped at ``cfg.max_logit_scale``) and
      ``logit_bias`` [] or None; the image-text logits are
      ``logit_scale * image_features @ text_features.T`` (+ ``logit_bias``).
    """

    inference_dtype: torch.dtype | None = None  # set by to_inference

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        self.text = (
            HFTextTower(cfg.hf_text, cfg.embed_dim)
            if cfg.hf_text is not None
            else TextTransformer(cfg.text, cfg.embed_dim)
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(cfg.init_logit_bias))) if cfg.init_logit_bias is not None else None
        )
        self.region_head = RegionHead(cfg.embed_dim, self.visual.grid) if cfg.region_head else None

    def to_inference(self, dtype: torch.dtype | str | None = None) -> CLIP:
        """This model, prepared for embedding only (module docstring): ``eval()``, every parameter
        frozen and, with ``dtype`` (``torch.bfloat16``, ``"bf16"``, ``"fp32"``...), cast to it once.
        ``encode_image`` / ``encode_text`` then cast their pixel input to that dtype; for bf16 and fp16
        they return float32 embeddings (normalized in float32). Returns ``self``; ``train()`` raises afterwards.
        On CPU the transformer blocks then run fused oneDNN kernels (bias and GELU inside the linear layers'
        kernels: :mod:`clipforge.models.fused_inference`), and a causal text tower runs a batch of texts packed,
        its linear layers on real tokens only (:mod:`clipforge.models.packed_text`); the state dict is
        unchanged."""
        # imported here, not at the top: a new module-level import would count as a change to code every recorded
        # training run executed (benchmarks/fidelity.py's code record), and only inference needs it
        from .fused_inference import fuse_for_inference
        from .packed_text import pack_text_towers

        dtype = _parse_dtype(dtype) if dtype is not None else next(self.parameters()).dtype
        self.eval()
        self.requires_grad_(False)
        self.to(dtype)
        self.inference_dtype = dtype
        fuse_for_inference(self)
        pack_text_towers(self)
        return self

    def train(self, mode: bool = True) -> CLIP:
        if mode and self.inference_dtype is not None:
            raise ConfigError("this model was prepared for inference with to_inference() (frozen, "
                              f"{self.inference_dtype} weights) and cannot be trained; load or build it again "
                              "for training")
        return super().train(mode)

    def _finish(self, x: Tensor, normalize: bool) -> Tensor:
        if self.inference_dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return F.normalize(x, dim=-1) if normalize else x

    @property
    def image_size(self) -> int:
        return self.cfg.vision.image_size

    @property
    def context_length(self) -> int:
        return self.cfg.hf_text.context_length if self.cfg.hf_text is not None else self.cfg.text.context_length

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward to trade compute for memory."""
        self.visual.transformer.grad_checkpointing = enable
        if isinstance(self.text, HFTextTower):
            if enable:
                self.text.encoder.gradient_checkpointing_enable()
            else:
                self.text.encoder.gradient_checkpointing_disable()
        else:
            self.text.transformer.grad_checkpointing = enable

    def _tower(self, tower: nn.Module, *args) -> Tensor:
        """``tower(*args)``, through torch.compile when ``cfg.compile`` is set and we are training."""
        if self.cfg.compile and self.training and torch.is_grad_enabled():
            return call_compiled(tower, *args)
        return tower(*args)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        if self.inference_dtype is not None and images.is_floating_point():
            images = images.to(self.inference_dtype)
        return self._finish(self._tower(self.visual, images), normalize)

    def encode_text(self, ids: Tensor, normalize: bool = True, embeddings: Tensor | None = None) -> Tensor:
        """Text embeddings of token ``ids`` [B, L]. ``embeddings`` [B, L, width] replaces the
        token-embedding lookup (prompt learning); ``ids`` still mark the end-of-text token."""
        if embeddings is None:
            x = self._tower(self.text, ids)
        elif isinstance(self.text, TextTransformer):
            x = self._tower(self.text, ids, embeddings)
        else:
            raise ValueError("token embeddings as text input need clipforge's own text transformer, "
                             f"not a {type(self.text).__name__}")
        return self._finish(x, normalize)

    def encode_image_tokens(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(normalized image embeddings [B, d], projected patch tokens [B, N, d]) from one pass of
        the image tower; the tokens go through the tower's projection like the pooled feature
        (unnormalized; the class token, if any, is left out)."""
        tokens = self.visual.forward_tokens(images)
        pooled = self.visual.project(self.visual.pool(tokens))
        return F.normalize(pooled, dim=-1), self.visual.project(tokens[:, self.visual.num_prefix:])

    def encode_text_tokens(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(normalized text embeddings [B, d], projected token features [B, L, d], mask [B, L]) from
        one pass of the text tower. The mask is True for the text's own tokens: after the start
        token up to and including the end-of-text token (whose state is the pooled one), False for
        the start token (identical for every text under the causal mask) and the padding."""
        if not isinstance(self.text, TextTransformer):
            raise ValueError("token-level text features need clipforge's own text transformer, "
                             f"not a {type(self.text).__name__}")
        states = self.text.forward_tokens(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)
        mask = (positions >= 1) & (positions <= self.text.eot_index(ids)[:, None]) & (ids != self.text.cfg.pad_token_id)
        return F.normalize(self.text.project(self.text.pool(states, ids)), dim=-1), self.text.project(states), mask

    def encode_text_attention(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(normalized text embeddings [B, d], the text tower's last-layer attention probabilities
        [B, heads, L, L]) from one pass in which the attention maps are nodes of the autograd graph
        (:meth:`TextTransformer.forward_tokens_with_attention`): d(embedding)/d(attention) is available."""
        if not isinstance(self.text, TextTransformer):
            raise ValueError("attention maps of the text tower need clipforge's own text transformer, "
                             f"not a {type(self.text).__name__}")
        states, weights = self.text.forward_tokens_with_attention(ids)
        return F.normalize(self.text.project(self.text.pool(states, ids)), dim=-1), weights

    def _require_region_head(self) -> RegionHead:
        if self.region_head is None:
            raise ValueError("this model has no region head, so it cannot encode regions; build it with "
                             "region_head=True (clipforge train ... model_overrides.region_head=true, or a CLOC loss "
                             "term) or crop the boxes and use encode_image")
        return self.region_head

    def encode_regions(self, images: Tensor, boxes: Tensor, normalize: bool = True) -> Tensor:
        """CLOC region embeddings [B, R, d] of ``boxes`` [B, R, 4] (normalized x0, y0, x1, y1) in ``images``:
        the region head (models/region_head.py) over one pass of the image tower's projected patch tokens."""
        head = self._require_region_head()
        _, tokens = self.encode_image_tokens(images)
        x = head(tokens, boxes.to(tokens.dtype))
        return F.normalize(x, dim=-1) if normalize else x

    def region_outputs(self, images: Tensor, boxes: Tensor, region_text_features: Tensor) -> tuple[Tensor, Tensor]:
        """(normalized region embeddings [B, R, d], grounded boxes [B, R, 4]) from one pass of the image tower:
        the boxes' embeddings and the boxes the head predicts for the region captions' embeddings (CLOC)."""
        head = self._require_region_head()
        _, tokens = self.encode_image_tokens(images)
        return F.normalize(head(tokens, boxes.to(tokens.dtype)), dim=-1), head.ground(tokens, region_text_features)

    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    def forward(self, images: Tensor | None = None, texts: Tensor | None = None,
                return_tokens: bool = False) -> dict[str, Tensor | None]:
        """The features of ``images`` and ``texts`` (either may be None), the logit scale and bias;
        with ``return_tokens`` also their projected token features and the text mask (module docstring)."""
        out = {"logit_scale": self.scale(), "logit_bias": self.logit_bias}
        if not return_tokens:
            return {"image_features": self.encode_image(images) if images is not None else None,
                    "text_features": self.encode_text(texts) if texts is not None else None, **out}
        out["image_features"], out["image_tokens"] = (
            self.encode_image_tokens(images) if images is not None else (None, None)
        )
        out["text_features"], out["text_tokens"], out["text_mask"] = \
            self.encode_text_tokens(texts) if texts is not None else (None, None, None)
        return out

    def no_weight_decay_names(self) -> set[str]:
        """Parameters that AdamW should not decay: norms, biases, embeddings, scale and bias."""
        names = set()
        for name, p in self.named_parameters():
            if p.ndim < 2 or "embedding" in name or name in {"logit_scale", "logit_bias"}:
                names.add(name)
        return names


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"inference dtype must be a floating-point type, got {dtype}; use fp32 or bf16")
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown inference dtype '{dtype}'; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]
