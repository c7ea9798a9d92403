"""Hugging Face ``CLIPModel`` and ``SiglipModel`` layouts: config translation and weight rules.

Shapes (widths, depths, vocabulary, positions, patch size, projection size, MLP width) are
read from the weights; what weights cannot tell (heads, activation, LayerNorm epsilon,
end-of-text id) comes from config.json, falling back to transformers' defaults for each
family because ``save_pretrained`` writes only values that differ from them.

CLIP (Radford et al., 2021): class token, pre-LayerNorm on the patch sequence, causal text
transformer pooled at the end-of-text token, bias-free projections. SigLIP (Zhai et al.,
2023): no class token, bias on the patch embedding, MAP attention-pooling head and no image
projection, bidirectional text transformer without a padding mask pooled at the last
position, text head with bias, learned logit bias.
"""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..models.config import CLIPConfig, TextConfig, VisionConfig
from .keymap import Rule, block_rules, count_layers, rule

HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
OUR_ACTS_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}

DEFAULTS = {
    "clip": {
        "text": {
            "num_attention_heads": 8,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "eos_token_id": 49407,
            "pad_token_id": 1,
        },
        "vision": {"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    },
    "siglip": {
        "text": {
            "num_attention_heads": 12,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        "vision": {"num_attention_heads": 12, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
    },
}

BLOCK = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "attn.in_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.in_proj.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "mlp.0.weight": "mlp.fc1.weight", "mlp.0.bias": "mlp.fc1.bias",
    "mlp.2.weight": "mlp.fc2.weight", "mlp.2.bias": "mlp.fc2.bias",
}


def _sub(hf: dict, family: str, tower: str) -> dict:
    return {**DEFAULTS[family][tower], **{k: v for k, v in (hf.get(f"{tower}_config") or {}).items() if v is not None}}


def _act(name: str, where: str) -> str:
    if name not in HF_ACTS:
        raise ValueError(f"{where}: activation '{name}' is not supported; clipforge has {sorted(HF_ACTS)}")
    return HF_ACTS[name]


def _ln(sd: dict, key: str) -> None:
    if key not in sd:
        raise KeyError(f"missing key '{key}' in the weights")


def config_from_hf(hf: dict[str, Any], sd: dict[str, Tensor]) -> CLIPConfig:
    """A :class:`CLIPConfig` for a Hugging Face CLIP or SigLIP config.json and its weights."""
    family = hf.get("model_type")
    if family not in DEFAULTS:
        raise ValueError(f"config.json has model_type '{family}'; clipforge reads 'clip' and 'siglip'")
    tc, vc = _sub(hf, family, "text"), _sub(hf, family, "vision")
    for key in ("text_model.embeddings.token_embedding.weight", "vision_model.embeddings.patch_embedding.weight"):
        _ln(sd, key)
    vocab, t_width = sd["text_model.embeddings.token_embedding.weight"].shape
    ctx = sd["text_model.embeddings.position_embedding.weight"].shape[0]
    patch_w = sd["vision_model.embeddings.patch_embedding.weight"]
    v_width, patch = patch_w.shape[0], patch_w.shape[-1]
    n_pos = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    siglip = family == "siglip"
    grid = math.isqrt(n_pos - (0 if siglip else 1))
    t_layers = count_layers(sd, "text_model.encoder.layers.")
    v_layers = count_layers(sd, "vision_model.encoder.layers.")
    t_mlp = sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0] if t_layers else 4 * t_width
    v_mlp = sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0] if v_layers else 4 * v_width
    if siglip:
        if "vision_model.head.probe" not in sd:
            raise ValueError("this SigLIP checkpoint has no vision attention-pooling head (vision_use_head=False); "
                             "clipforge needs the head to give image embeddings")
        embed_dim = sd["text_model.head.weight"].shape[0]
        eot = tc["eos_token_id"]
    else:
        embed_dim = sd["visual_projection.weight"].shape[0]
        # eos_token_id == 2 is transformers' legacy marker for "pool at the largest id", which for
        # CLIP's vocabulary is the end-of-text token, the last id.
        eot = vocab - 1 if tc["eos_token_id"] == 2 else tc["eos_token_id"]
    vision = VisionConfig(
        image_size=grid * patch, patch_size=patch, width=v_width, layers=v_layers, heads=vc["num_attention_heads"],
        mlp_ratio=v_mlp / v_width, act=_act(vc["hidden_act"], "vision_config"), ln_eps=vc["layer_norm_eps"],
        ln_pre=not siglip, class_token=not siglip, patch_bias=siglip, pool="map" if siglip else "cls",
        proj=not siglip, attn_pool_heads=vc["num_attention_heads"],
    )
    text = TextConfig(
        vocab_size=vocab, context_length=ctx, width=t_width, layers=t_layers, heads=tc["num_attention_heads"],
        mlp_ratio=t_mlp / t_width, act=_act(tc["hidden_act"], "text_config"), ln_eps=tc["layer_norm_eps"],
        pool="last" if siglip else "eot", eot_token_id=eot, pad_token_id=tc["pad_token_id"] or 0,
        causal=not siglip, proj_bias=siglip, pad_mask=not siglip,
    )
    scale = float(sd["logit_scale"].reshape(())) if "logit_scale" in sd else math.log(1 / 0.07)
    bias = float(sd["logit_bias"].reshape(())) if siglip and "logit_bias" in sd else (-10.0 if siglip else None)
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, init_logit_scale=scale, init_logit_bias=bias)


def hf_rules(cfg: CLIPConfig, family: str) -> list[Rule]:
    """How each clipforge tensor maps to the Hugging Face ``family`` ('clip' or 'siglip') layout."""
    v, t = "vision_model.", "text_model."
    rules = [
        rule("visual.patch_embed.weight", v + "embeddings.patch_embedding.weight"),
        rule("visual.positional_embedding", v + "embeddings.position_embedding.weight"),
        *block_rules("visual.transformer.blocks.", v + "encoder.layers.", cfg.vision.layers, BLOCK),
        rule("visual.ln_post.weight", v + "post_layernorm.weight"),
        rule("visual.ln_post.bias", v + "post_layernorm.bias"),
        rule("text.token_embedding.weight", t + "embeddings.token_embedding.weight"),
        rule("text.positional_embedding", t + "embeddings.position_embedding.weight"),
        *block_rules("text.transformer.blocks.", t + "encoder.layers.", cfg.text.layers, BLOCK),
        rule("text.ln_final.weight", t + "final_layer_norm.weight"),
        rule("text.ln_final.bias", t + "final_layer_norm.bias"),
        rule("logit_scale", "logit_scale", "scalar"),
    ]
    if family == "clip":
        rules += [
            rule("visual.class_embedding", v + "embeddings.class_embedding"),
            rule("visual.ln_pre.weight", v + "pre_layrnorm.weight"),
            rule("visual.ln_pre.bias", v + "pre_layrnorm.bias"),
            rule("visual.proj", "visual_projection.weight", "transpose"),
            rule("text.proj", "text_projection.weight", "transpose"),
        ]
    else:
        h = v + "head."
        rules += [
            rule("visual.patch_embed.bias", v + "embeddings.patch_embedding.bias"),
            rule("visual.attn_pool.probe", h + "probe"),
            rule("visual.attn_pool.attn.in_proj_weight", h + "attention.in_proj_weight"),
            rule("visual.attn_pool.attn.in_proj_bias", h + "attention.in_proj_bias"),
            rule("visual.attn_pool.attn.out_proj.weight", h + "attention.out_proj.weight"),
            rule("visual.attn_pool.attn.out_proj.bias", h + "attention.out_proj.bias"),
            rule("visual.attn_pool.ln.weight", h + "layernorm.weight"),
            rule("visual.attn_pool.ln.bias", h + "layernorm.bias"),
            rule("visual.attn_pool.mlp.0.weight", h + "mlp.fc1.weight"),
            rule("visual.attn_pool.mlp.0.bias", h + "mlp.fc1.bias"),
            rule("visual.attn_pool.mlp.2.weight", h + "mlp.fc2.weight"),
            rule("visual.attn_pool.mlp.2.bias", h + "mlp.fc2.bias"),
            rule("text.proj", t + "head.weight", "transpose"),
            rule("text.proj_bias", t + "head.bias"),
            rule("logit_bias", "logit_bias", "scalar"),
        ]
    return rules


def hf_family_of(cfg: CLIPConfig) -> str:
    """'clip' or 'siglip' when ``cfg`` is expressible in that Hugging Face layout, else a clear error."""
    v, t = cfg.vision, cfg.text
    if cfg.hf_text is not None:
        raise ValueError("a model with a Hugging Face text tower (hf_text) has no CLIPModel/SiglipModel equivalent")
    clip_like = (v.class_token and v.ln_pre and v.pool == "cls" and v.proj and not v.patch_bias and t.causal
                 and t.pool == "eot" and not t.proj_bias)
    siglip_like = (
        not v.class_token
        and not v.ln_pre
        and v.pool == "map"
        and not v.proj
        and v.patch_bias
        and not t.causal
        and not t.pad_mask
        and t.pool == "last"
        and t.proj_bias
        and v.attn_pool_heads == v.heads
    )
    if clip_like:
        return "clip"
    if siglip_like:
        return "siglip"
    raise ValueError("this architecture matches neither transformers' CLIPModel (class token, ln_pre, cls pooling, "
                     "causal EOT text) nor SiglipModel (MAP head, no class token, bidirectional last-token text)")


def hf_config_from(cfg: CLIPConfig, family: str) -> dict[str, Any]:
    """A complete config.json for transformers' CLIPModel / SiglipModel."""
    v, t = cfg.vision, cfg.text
    for name, act in (("vision", v.act), ("text", t.act)):
        if act not in OUR_ACTS_TO_HF:
            raise ValueError(f"{name} activation '{act}' has no transformers equivalent")
    text = {"vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": int(t.width * t.mlp_ratio),
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
            "hidden_act": OUR_ACTS_TO_HF[t.act], "layer_norm_eps": t.ln_eps, "eos_token_id": t.eot_token_id,
            "pad_token_id": t.pad_token_id}
    vision = {"hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio), "num_hidden_layers": v.layers,
              "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
              "hidden_act": OUR_ACTS_TO_HF[v.act], "layer_norm_eps": v.ln_eps, "num_channels": 3}
    if family == "clip":
        text.update(bos_token_id=max(t.eot_token_id - 1, 0), model_type="clip_text_model")
        vision["model_type"] = "clip_vision_model"
        return {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": cfg.embed_dim,
                "logit_scale_init_value": cfg.init_logit_scale, "text_config": text, "vision_config": vision}
    text.update(projection_size=cfg.embed_dim, model_type="siglip_text_model")
    vision.update(model_type="siglip_vision_model", vision_use_head=True)
    return {"model_type": "siglip", "architectures": ["SiglipModel"], "text_config": text, "vision_config": vision}
