"""OpenCLIP and original OpenAI CLIP checkpoints: architecture inference and weight rules.

Both share one layout (``visual.conv1.weight``, ``visual.transformer.resblocks.{i}.attn.in_proj_weight``,
``text_projection``, ...). Widths, depths, patch size, image size, context length, vocabulary
and projection size come from the tensor shapes. Heads come from the OpenCLIP model config
when given (``vision_cfg.head_width``, ``text_cfg.heads``), else the OpenAI rule (64 channels
per head). The activation is quick_gelu for OpenAI checkpoints and whatever the OpenCLIP
config says (``quick_gelu: true``) otherwise, because weights cannot tell.
"""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..models.config import CLIPConfig, TextConfig, VisionConfig
from .keymap import Rule, block_rules, count_layers, rule

BLOCK = {
    "ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias",
    "attn.in_proj.weight": "attn.in_proj_weight", "attn.in_proj.bias": "attn.in_proj_bias",
    "attn.out_proj.weight": "attn.out_proj.weight", "attn.out_proj.bias": "attn.out_proj.bias",
    "ln_2.weight": "ln_2.weight", "ln_2.bias": "ln_2.bias",
    "mlp.0.weight": "mlp.c_fc.weight", "mlp.0.bias": "mlp.c_fc.bias",
    "mlp.2.weight": "mlp.c_proj.weight", "mlp.2.bias": "mlp.c_proj.bias",
}
# buffers and metadata that OpenAI/OpenCLIP checkpoints carry but clipforge recomputes
IGNORED = ("attn_mask", "input_resolution", "context_length", "vocab_size", "position_ids")


def is_openclip_state(sd: dict[str, Tensor]) -> bool:
    return "visual.conv1.weight" in sd and "token_embedding.weight" in sd


def config_from_openclip(sd: dict[str, Tensor], model_cfg: dict[str, Any] | None, openai: bool) -> CLIPConfig:
    """Infer a :class:`CLIPConfig` from OpenCLIP/OpenAI weights plus the optional OpenCLIP model config."""
    if "visual.layer1.0.conv1.weight" in sd:
        raise ValueError("this is a ModifiedResNet (RN50-family) image tower; clipforge supports ViT image towers only")
    mc = model_cfg or {}
    vcfg, tcfg = mc.get("vision_cfg", {}), mc.get("text_cfg", {})
    for key in ("timm_model_name", "hf_model_name"):
        if vcfg.get(key) or tcfg.get(key):
            raise ValueError(f"the OpenCLIP config uses {key}={vcfg.get(key) or tcfg.get(key)!r}; clipforge reads "
                             "OpenCLIP models with its own ViT image tower and text transformer only")
    if "text_projection.weight" in sd:
        raise ValueError("this OpenCLIP text tower has a Linear text projection (text_cfg.proj_type); not supported")
    conv = sd["visual.conv1.weight"]
    v_width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    v_layers = count_layers(sd, "visual.transformer.resblocks.")
    t_layers = count_layers(sd, "transformer.resblocks.")
    vocab, t_width = sd["token_embedding.weight"].shape
    ctx = sd["positional_embedding"].shape[0]
    v_mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    t_mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    act = "quick_gelu" if openai or mc.get("quick_gelu") else "gelu"
    v_heads = max(1, v_width // int(vcfg.get("head_width", 64)))
    t_heads = int(tcfg.get("heads", max(1, t_width // 64)))
    if vcfg.get("patch_dropout") or vcfg.get("attentional_pool") or vcfg.get("final_ln_after_pool") or vcfg.get("no_ln_pre"):
        raise ValueError("the OpenCLIP vision_cfg uses options clipforge does not reproduce "
                         "(attentional_pool / final_ln_after_pool / no_ln_pre)")
    pool = vcfg.get("pool_type", "tok")
    if pool not in ("tok",):
        raise ValueError(f"OpenCLIP vision pool_type '{pool}' is not supported; clipforge reads pool_type='tok'")
    t_pool = tcfg.get("pool_type", "argmax")
    if t_pool not in ("argmax", "eos"):
        raise ValueError(f"OpenCLIP text pool_type '{t_pool}' is not supported; clipforge reads 'argmax' and 'eos'")
    vision = VisionConfig(image_size=grid * patch, patch_size=patch, width=v_width, layers=v_layers, heads=v_heads,
                          mlp_ratio=v_mlp / v_width, act=act)
    # 'argmax' pools at the largest id: CLIP's end-of-text token is the last id of the vocabulary
    text = TextConfig(vocab_size=vocab, context_length=ctx, width=t_width, layers=t_layers, heads=t_heads,
                      mlp_ratio=t_mlp / t_width, act=act, eot_token_id=vocab - 1)
    scale = float(sd["logit_scale"]) if "logit_scale" in sd else math.log(1 / 0.07)
    bias = float(sd["logit_bias"].reshape(())) if "logit_bias" in sd else None
    return CLIPConfig(embed_dim=sd["visual.proj"].shape[1], vision=vision, text=text, init_logit_scale=scale,
                      init_logit_bias=bias)


def openclip_rules(cfg: CLIPConfig) -> list[Rule]:
    rules = [
        rule("visual.patch_embed.weight", "visual.conv1.weight"),
        rule("visual.class_embedding", "visual.class_embedding"),
        rule("visual.positional_embedding", "visual.positional_embedding"),
        rule("visual.ln_pre.weight", "visual.ln_pre.weight"), rule("visual.ln_pre.bias", "visual.ln_pre.bias"),
        *block_rules("visual.transformer.blocks.", "visual.transformer.resblocks.", cfg.vision.layers, BLOCK),
        rule("visual.ln_post.weight", "visual.ln_post.weight"), rule("visual.ln_post.bias", "visual.ln_post.bias"),
        rule("visual.proj", "visual.proj"),
        rule("text.token_embedding.weight", "token_embedding.weight"),
        rule("text.positional_embedding", "positional_embedding"),
        *block_rules("text.transformer.blocks.", "transformer.resblocks.", cfg.text.layers, BLOCK),
        rule("text.ln_final.weight", "ln_final.weight"), rule("text.ln_final.bias", "ln_final.bias"),
        rule("text.proj", "text_projection"),
        rule("logit_scale", "logit_scale", "scalar"),
    ]
    if cfg.init_logit_bias is not None:
        rules.append(rule("logit_bias", "logit_bias", "scalar"))
    return rules
