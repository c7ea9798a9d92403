"""Typed configuration of the dual encoder, loadable from plain JSON files.

Each named model (``tiny``, ``ViT-B-32``, ...) is a JSON file in ``model_configs/`` with
the same shape as these dataclasses, in the spirit of OpenCLIP's model configs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    pool: Literal["cls", "mean", "attn"] = "cls"
    act: Literal["gelu", "quick_gelu"] = "gelu"
    ln_pre: bool = True  # OpenAI CLIP normalizes the patch sequence before the blocks
    ln_eps: float = 1e-5
    attn_pool_heads: int = 8  # only for pool == "attn"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    act: Literal["gelu", "quick_gelu"] = "gelu"
    pool: Literal["eot", "mean", "first"] = "eot"
    eot_token_id: int = 49407
    pad_token_id: int = 0
    causal: bool = True
    ln_eps: float = 1e-5

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)
    # None: no bias (softmax CLIP). SigLIP initializes the bias at -10 and log-scale at log(10).
    init_logit_bias: float | None = None
    max_logit_scale: float = 100.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"name", "description"}
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known keys: {sorted(known)}")
        vision = VisionConfig(**d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        d.pop("name", None), d.pop("description", None)
        return cls(vision=vision, text=text, **d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
