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
    # cls: class token (CLIP); mean: mean of patch tokens; attn: learned-query attention + LN;
    # map: SigLIP's multi-head attention pooling head (attention, then x + MLP(LN(x)))
    pool: Literal["cls", "mean", "attn", "map"] = "cls"
    act: Literal["gelu", "quick_gelu", "gelu_tanh"] = "gelu"
    ln_pre: bool = True  # OpenAI CLIP normalizes the patch sequence before the blocks
    ln_eps: float = 1e-5
    attn_pool_heads: int = 8  # only for pool == "attn" / "map"
    class_token: bool = True  # SigLIP has none: positions cover the patches only
    patch_bias: bool = False  # SigLIP's patch embedding has a bias
    proj: bool = True  # False: the pooled width is the embedding (SigLIP), width must equal embed_dim

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError(
                "pool='cls' needs class_token=True; use pool='mean', 'attn' or 'map' without a class token"
            )


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    act: Literal["gelu", "quick_gelu", "gelu_tanh"] = "gelu"
    # eot: first end-of-text token (CLIP); last: the last position (SigLIP); first; mean over non-padding
    pool: Literal["eot", "mean", "first", "last"] = "eot"
    eot_token_id: int = 49407
    pad_token_id: int = 0
    causal: bool = True
    ln_eps: float = 1e-5
    proj_bias: bool = False  # SigLIP's text head is a Linear layer with a bias
    pad_mask: bool = True  # non-causal only: hide padding keys (SigLIP attends to its padding: False)

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")


@dataclass
class HFTextConfig:
    """A pretrained Hugging Face encoder (BERT family) as the text tower; see models/hf_text.py."""

    path: str = ""  # a local directory with config.json and weights (or a hub id when online)
    pool: Literal["mean", "cls"] = "mean"
    context_length: int = 128
    lock: bool = True  # freeze the encoder; the projection always trains
    unlocked_layers: int = 0  # with lock: train the last N encoder layers (partly unlocked)
    pretrained: bool = True  # False: same architecture, random weights (the "from scratch" arm)

    def __post_init__(self):
        if not self.path:
            raise ValueError("HFTextConfig.path is empty: give the directory of a Hugging Face text encoder")
        if self.unlocked_layers < 0:
            raise ValueError(f"unlocked_layers must be >= 0, got {self.unlocked_layers}")


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)
    # None: no bias (softmax CLIP). SigLIP initializes the bias at -10 and log-scale at log(10).
    init_logit_bias: float | None = None
    max_logit_scale: float = 100.0
    # set: a pretrained Hugging Face encoder replaces the text transformer (``text`` is then unused)
    hf_text: HFTextConfig | None = None
    # train the towers through torch.compile (inductor); evaluation stays eager. An execution
    # setting, not architecture: saved configs carry it, and it changes no result beyond rounding.
    # See clipforge/models/compile.py and docs/performance.md.
    compile: bool = False
    # CLOC's promptable region head (models/region_head.py): ``encode_regions(images, boxes)``
    region_head: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"name", "description"}
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known keys: {sorted(known)}")
        vision = VisionConfig(**d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        hf_text = d.pop("hf_text", None)
        hf_text = HFTextConfig(**hf_text) if isinstance(hf_text, dict) else hf_text
        d.pop("name", None), d.pop("description", None)
        return cls(vision=vision, text=text, hf_text=hf_text, **d)

    @classmethod
    def variant_from_dict(cls, d: dict[str, Any], sections: dict[str, Any],
                          text_defaults: dict[str, Any] | None = None) -> Any:
        """A variant config (a subclass with extra fields) from a dict: the variant's own entries are
        taken out of ``d``, the rest is parsed as a :class:`CLIPConfig` and its fields are copied over.

        ``sections`` maps each of the variant's own fields to its type: a dataclass (its entry, a dict,
        is passed as keyword arguments; an entry that is already an instance is kept), or a plain type
        (``bool``, ``int``, ...) that converts the entry. A missing entry keeps the field's default.
        ``text_defaults`` are the variant's defaults for the ``text`` section, under the given values.
        """
        if cls is CLIPConfig:
            raise TypeError("variant_from_dict builds a subclass of CLIPConfig; use CLIPConfig.from_dict")
        d = dict(d)
        own = {}
        for name, kind in sections.items():
            if name not in d:
                continue
            value = d.pop(name)
            if dataclasses.is_dataclass(kind) and isinstance(value, dict):
                value = kind(**value)
            elif not dataclasses.is_dataclass(kind) and value is not None:
                value = kind(value)
            own[name] = value
        if text_defaults:
            d["text"] = {**text_defaults, **d.get("text", {})}
        base = CLIPConfig.from_dict(d)
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(CLIPConfig)}, **own)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
