"""OpenCLIP and original OpenAI CLIP checkpoints: architecture inference and weight rules.

Both share one layout (``visual.conv1.weight``, ``visual.transformer.resblocks.{i}.attn.in_proj_weight``,
``text_projection``, ...). Widths, depths, patch size, image size, context length, vocabulary
and projection size come from the tensor shapes. Heads come from the OpenCLIP model config
(``vision_cfg.head_width``, ``text_cfg.heads``), else the OpenAI rule (64 channels per head).
The activation is quick_gelu for OpenAI checkpoints and whatever the OpenCLIP config says
(``quick_gelu: true``) otherwise, because weights cannot tell; ``clipforge.interop.load``
decides where the config comes from (a file, a model name, or the OpenAI reading).
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
CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
IGNORED = ("attn_mask", "input_resolution", "context_length", "vocab_size", "position_ids")


def is_openclip_state(sd: dict[str, Tensor]) -> bool:
    return "visual.conv1.weight" in sd and "token_embedding.weight" in sd


def unsupported_options(model_cfg: dict[str, Any]) -> list[str]:
    """The options of an OpenCLIP model config that clipforge's ViT and text transformer do not reproduce.

    Empty for the classic CLIP layout (OpenCLIP's ``VisionTransformer`` and ``TextTransformer``
    with their defaults); otherwise one entry per option, e.g. ``"vision_cfg.timm_model_name"``.
    """
    mc = model_cfg or {}
    vcfg, tcfg = mc.get("vision_cfg") or {}, mc.get("text_cfg") or {}
    out = [f"{k}" for k in ("multimodal_cfg",) if mc.get(k)]  # CoCa
    for key in ("timm_model_name", "hf_model_name"):
        out += [f"{tower}.{key}" for tower, c in (("vision_cfg", vcfg), ("text_cfg", tcfg)) if c.get(key)]
    if not isinstance(vcfg.get("layers", 12), int):
        out.append("vision_cfg.layers (a ModifiedResNet, RN50-family)")
    out += [f"vision_cfg.{k}" for k in ("attentional_pool", "final_ln_after_pool", "no_ln_pre", "ls_init_value",
                                        "patch_dropout") if vcfg.get(k)]
    if vcfg.get("pool_type", "tok") != "tok":
        out.append(f"vision_cfg.pool_type={vcfg['pool_type']}")
    out += [f"text_cfg.{k}" for k in ("embed_cls", "no_causal_mask", "proj_bias", "act_kwargs", "ls_init_value",
                                      "final_ln_after_pool") if tcfg.get(k)]
    for tower, c in (("vision_cfg", vcfg), ("text_cfg", tcfg)):  # OpenCLIP's custom attention blocks
        out += [f"{tower}.{k}" for k in CUSTOM_BLOCK if c.get(k)]
        if c.get("block_type") not in (None, "default"):
            out.append(f"{tower}.block_type={c['block_type']}")
    if tcfg.get("proj_type", "linear") != "linear":
        out.append(f"text_cfg.proj_type={tcfg['proj_type']}")
    for tower, c in (("vision_cfg", vcfg), ("text_cfg", tcfg)):
        if float((c.get("norm_kwargs") or {}).get("eps", 1e-5)) != 1e-5:
            out.append(f"{tower}.norm_kwargs.eps")
    if vcfg.get("act_kwargs"):
        out.append("vision_cfg.act_kwargs")
    if tcfg.get("pool_type", "argmax") != "argmax":
        out.append(f"text_cfg.pool_type={tcfg['pool_type']}")
    return out


def config_from_openclip(sd: dict[str, Tensor], model_cfg: dict[str, Any] | None, openai: bool,
                         what: str = "the OpenCLIP model config") -> CLIPConfig:
    """Infer a :class:`CLIPConfig` from OpenCLIP/OpenAI weights plus the OpenCLIP model config.

    ``openai=True`` is the OpenAI reading (quick_gelu, 64-channel heads) and needs no config.
    With a config, everything it states that the weights also show must agree with them
    (``what`` names the config in the message).
    """
    if "visual.layer1.0.conv1.weight" in sd:
        raise ValueError("this is a ModifiedResNet (RN50-family) image tower; clipforge supports ViT image towers only")
    mc = model_cfg or {}
    bad = unsupported_options(mc)
    if bad:
        raise ValueError(f"{what} uses options clipforge does not reproduce: {', '.join(bad)}; clipforge reads "
                         "OpenCLIP models with the classic CLIP ViT image tower and text transformer only")
    vcfg, tcfg = mc.get("vision_cfg", {}), mc.get("text_cfg", {})
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
    embed_dim = sd["visual.proj"].shape[1]
    if mc:
        shown = {"embed_dim": embed_dim, "vision_cfg.width": v_width, "vision_cfg.layers": v_layers,
                 "vision_cfg.patch_size": patch, "vision_cfg.image_size": grid * patch, "text_cfg.width": t_width,
                 "text_cfg.layers": t_layers, "text_cfg.context_length": ctx, "text_cfg.vocab_size": vocab}
        stated = {"embed_dim": mc.get("embed_dim"), **{f"vision_cfg.{k}": vcfg.get(k) for k in
                  ("width", "layers", "patch_size", "image_size")}, **{f"text_cfg.{k}": tcfg.get(k) for k in
                  ("width", "layers", "context_length", "vocab_size")}}
        wrong = [f"{k}: {stated[k]} in the config, {shown[k]} in the weights" for k in shown
                 if stated[k] is not None and stated[k] != shown[k]]
        if wrong:
            raise ValueError(f"the weights do not fit {what}: {'; '.join(wrong)}. Give the model name or config the "
                             "checkpoint was trained with")
    act = "quick_gelu" if openai or mc.get("quick_gelu") else "gelu"
    v_heads = max(1, v_width // int(vcfg.get("head_width", 64)))
    # OpenCLIP's text default is 8 heads (CLIPTextCfg); OpenAI's rule is 64 channels per head
    t_heads = int(tcfg.get("heads", 8 if mc else max(1, t_width // 64)))
    vision = VisionConfig(image_size=grid * patch, patch_size=patch, width=v_width, layers=v_layers, heads=v_heads,
                          mlp_ratio=v_mlp / v_width, act=act)
    # 'argmax' pools at the largest id: CLIP's end-of-text token is the last id of the vocabulary
    text = TextConfig(vocab_size=vocab, context_length=ctx, width=t_width, layers=t_layers, heads=t_heads,
                      mlp_ratio=t_mlp / t_width, act=act, eot_token_id=vocab - 1)
    scale = float(sd["logit_scale"]) if "logit_scale" in sd else math.log(1 / 0.07)
    bias = float(sd["logit_bias"].reshape(())) if "logit_bias" in sd else None
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, init_logit_scale=scale, init_logit_bias=bias)


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
