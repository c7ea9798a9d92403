"""Export a clipforge model as a Hugging Face ``CLIPModel`` / ``SiglipModel`` directory.

Writes config.json (complete, so no transformers default is relied on) and model.safetensors
with the weights renamed by the same rules that import them (fused q/k/v split back,
projections transposed). CLIP-shaped models also get CLIP's tokenizer files (vocab.json,
merges.txt) and a preprocessor_config.json, so ``CLIPProcessor.from_pretrained`` works too.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..models import CLIP
from ..tokenizer import EOT_TOKEN, SOT_TOKEN, VOCAB_SIZE, load_bpe
from ..transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .hf_layouts import hf_config_from, hf_family_of, hf_rules
from .keymap import export_state


def _write_clip_tokenizer(directory: Path, context_length: int) -> None:
    vocab, merges = load_bpe()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "bos_token": SOT_TOKEN,
        "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": EOT_TOKEN}, indent=2))


def export_hf(model: CLIP, directory: str | Path) -> Path:
    """Write ``model`` so that ``transformers.AutoModel.from_pretrained(directory)`` reproduces it."""
    family = hf_family_of(model.cfg)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shapes = {"logit_scale": (1,), "logit_bias": (1,)} if family == "siglip" else {}
    weights = export_state(hf_rules(model.cfg, family), model.state_dict(), shapes)
    save_file({k: v.cpu() for k, v in weights.items()}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config_from(model.cfg, family), indent=2))
    if family == "clip":
        size = model.cfg.vision.image_size
        (directory / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN),
            "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True}, indent=2))
        if model.cfg.text.vocab_size == VOCAB_SIZE:
            _write_clip_tokenizer(directory, model.cfg.text.context_length)
    return directory
