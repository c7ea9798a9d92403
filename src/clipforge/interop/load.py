"""``clipforge.load(source) -> (model, tokenizer, preprocess)`` for the checkpoints of the ecosystem.

Formats (see ``FORMATS``), detected from the files, never from a model name:

- ``hf-clip`` / ``hf-siglip``: a Hugging Face directory with config.json (model_type clip or
  siglip) and model.safetensors (or pytorch_model.bin);
- ``openclip``: an OpenCLIP state dict (.safetensors, .pt, .bin) with its model config JSON
  (passed as ``model_config``, or ``open_clip_config.json`` / ``<stem>.json`` beside it);
- ``openai``: an original OpenAI CLIP checkpoint, TorchScript archive or state dict
  (quick_gelu, 64-channel heads);
- ``clipforge``: a directory written by ``save_model`` or a training run;
- ``hf-hub:ORG/NAME``: any of the directory formats, fetched through huggingface_hub.

Pickled files load with ``torch.load(weights_only=True)``; ``trust_pickle=True`` lifts that
for files you trust.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..models import CLIP, CLIPConfig, load_model
from ..tokenizer import VOCAB_SIZE, CLIPTokenizer
from ..transforms import EvalTransform
from .hf_layouts import config_from_hf, hf_rules
from .keymap import import_state, load_into
from .openclip_layout import IGNORED, config_from_openclip, is_openclip_state, openclip_rules
from .preprocess import preprocess_for
from .text_tokenizers import HFTokenizer, MissingTokenizer, has_tokenizer_files

FORMATS = {
    "hf-clip": "Hugging Face CLIPModel directory (config.json + model.safetensors)",
    "hf-siglip": "Hugging Face SiglipModel directory (config.json + model.safetensors)",
    "openclip": "OpenCLIP state dict (.safetensors/.pt/.bin) + its model config JSON",
    "openai": "original OpenAI CLIP checkpoint (TorchScript archive or state dict)",
    "clipforge": "clipforge model/checkpoint/run directory (model_config.json + model.safetensors)",
    "hf-hub": "hf-hub:ORG/NAME, a Hugging Face Hub repository in one of the directory formats",
    "pivot": "directory written by clipforge.train.pivot.save_pivot (CLIP + sentence encoder + projection, uCLIP)",
}
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _formats_help() -> str:
    return "; ".join(f"{k}: {v}" for k, v in FORMATS.items())


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """Tensors of a safetensors file, a TorchScript archive or a (weights-only) pickle."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist()):
                return {k: v for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        if trust_pickle:
            raise
        raise ValueError(
            f"'{path}' could not be read with torch.load(weights_only=True): {str(e).splitlines()[0]}. It holds more "
            "than tensors; pass trust_pickle=True only if you trust where the file came from (unpickling runs code)"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # an OpenCLIP training checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"'{path}' does not hold a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _weights_file(directory: Path, names: tuple[str, ...]) -> Path:
    for n in names:
        if (directory / n).exists():
            return directory / n
    raise FileNotFoundError(f"'{directory}' has no weights file: expected one of {list(names)}")


def _build(cfg: CLIPConfig, state: dict[str, Tensor], source: str) -> CLIP:
    with torch.device("meta"):
        model = CLIP(cfg)
    model = model.to_empty(device="cpu")
    load_into(model, state, source)
    return model.eval()


def _clip_tokenizer(directory: Path | None, cfg: CLIPConfig):
    if cfg.text.vocab_size == VOCAB_SIZE and cfg.text.eot_token_id == VOCAB_SIZE - 1:
        return CLIPTokenizer(cfg.text.context_length)
    if directory is not None and has_tokenizer_files(directory):
        return HFTokenizer(directory, cfg.text.context_length)
    return MissingTokenizer(directory or "", f"its vocabulary ({cfg.text.vocab_size} tokens) is not CLIP's BPE "
                                            "and no tokenizer files ship with it")


def load_hf_dir(directory: Path) -> tuple[CLIP, Any, Any]:
    hf = json.loads((directory / "config.json").read_text())
    family = hf.get("model_type")
    file = _weights_file(directory, ("model.safetensors", "pytorch_model.bin"))
    sd = read_state_dict(file)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    cfg = config_from_hf(hf, sd)
    model = _build(cfg, import_state(hf_rules(cfg, family), sd, str(file)), str(file))
    if family == "siglip":
        tok = (HFTokenizer(directory, cfg.text.context_length) if has_tokenizer_files(directory)
               else MissingTokenizer(directory, "SigLIP uses its own SentencePiece tokenizer"))
    else:
        tok = _clip_tokenizer(directory, cfg)
    return model, tok, preprocess_for(directory, family, cfg.vision.image_size)


def _find_model_config(file: Path) -> dict | None:
    for cand in (file.with_suffix(".json"), file.parent / "open_clip_config.json"):
        if cand.exists():
            d = json.loads(cand.read_text())
            return d.get("model_cfg", d)  # open_clip_config.json nests it under model_cfg
    return None


def load_openclip(sd: dict[str, Tensor], source: str, model_config: dict | None, openai: bool) -> CLIP:
    sd = {k: v for k, v in sd.items() if k not in IGNORED}
    cfg = config_from_openclip(sd, model_config, openai=openai)
    return _build(cfg, import_state(openclip_rules(cfg), sd, source, ignore=IGNORED), source)


def load(source: str | Path, model_config: str | Path | dict | None = None, trust_pickle: bool = False,
         openai: bool | None = None) -> tuple[CLIP, Any, Any]:
    """Load any supported checkpoint; see the module docstring for the formats.

    ``model_config``: the OpenCLIP model config (a dict or a JSON path) for OpenCLIP state
    dicts. ``openai``: force (True) or forbid (False) the OpenAI reading (quick_gelu) of an
    OpenCLIP-layout state dict; by default a file with no model config is read as OpenAI's.
    """
    if isinstance(source, str) and source.startswith("hf-hub:"):
        from .hub import download

        return load(download(source[len("hf-hub:"):]), model_config, trust_pickle, openai)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"'{source}' does not exist. clipforge.load reads: {_formats_help()}")
    if path.is_dir():
        if (path / "pivot.json").exists():  # uCLIP: the text side is a sentence encoder that reads raw text
            from ..models.pivot import texts_as_is
            from ..train.pivot import load_pivot

            model = load_pivot(path)
            return model, texts_as_is, EvalTransform(model.image_size)
        if (path / "model_config.json").exists() or (path / "checkpoints" / "latest.json").exists():
            model = load_model(path)
            if model.cfg.hf_text is not None:
                return model, HFTokenizer(model.cfg.hf_text.path, model.context_length), EvalTransform(model.image_size)
            return model, _clip_tokenizer(None, model.cfg), EvalTransform(model.image_size)
        if (path / "config.json").exists():
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
            if model_type in ("clip", "siglip"):
                return load_hf_dir(path)
            raise ValueError(f"'{path}/config.json' has model_type '{model_type}'; clipforge.load reads: {_formats_help()}")
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if (path / name).exists():
                return load(path / name, model_config, trust_pickle, openai)
        raise ValueError(f"'{path}' is a directory in no known format. clipforge.load reads: {_formats_help()}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"'{path.name}' is not a weights file ({', '.join(WEIGHT_SUFFIXES)}). clipforge.load reads: "
                         f"{_formats_help()}")
    sd = read_state_dict(path, trust_pickle)
    if not is_openclip_state(sd):
        raise ValueError(f"'{path}' holds a state dict of no known layout (first keys: {list(sd)[:4]}). "
                         f"clipforge.load reads: {_formats_help()}")
    if isinstance(model_config, (str, Path)):
        model_config = json.loads(Path(model_config).read_text())
        model_config = model_config.get("model_cfg", model_config)
    model_config = model_config if model_config is not None else _find_model_config(path)
    is_openai = openai if openai is not None else model_config is None
    model = load_openclip(sd, str(path), model_config, is_openai)
    return model, _clip_tokenizer(None, model.cfg), EvalTransform(model.image_size)
