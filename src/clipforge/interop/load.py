"""``clipforge.load(source) -> (model, tokenizer, preprocess)`` for the checkpoints of the ecosystem.

Formats (see ``FORMATS``), detected from the files:

- ``hf-clip`` / ``hf-siglip``: a Hugging Face directory with config.json (model_type clip or
  siglip) and model.safetensors (or pytorch_model.bin);
- ``openclip``: an OpenCLIP state dict (.safetensors, .pt, .bin, or an OpenCLIP training
  checkpoint ``epoch_N.pt``) plus what its weights cannot show, from the first of: ``model_config=``;
  ``model_name=`` (an OpenCLIP model name, :mod:`clipforge.interop.openclip_models`);
  ``open_clip_config.json`` / ``<stem>.json`` beside the file; the training run's ``params.txt``
  or the run name OpenCLIP stores in the checkpoint;
- ``openai``: an original OpenAI CLIP checkpoint (quick_gelu, 64-channel heads): ``openai=True``,
  a TorchScript archive, or a state dict carrying OpenAI's ``input_resolution`` /
  ``context_length`` / ``vocab_size`` entries;
- ``clipforge``: a directory written by ``save_model`` or a training run;
- ``hf-hub:ORG/NAME``: any of the directory formats, fetched through huggingface_hub.

An OpenCLIP-layout state dict with none of these is refused: GELU and QuickGELU models have
the same weights, and a wrong guess changes every embedding.

Untrusted files: pickles load with ``torch.load(weights_only=True)`` and TorchScript archives
(which run code when loaded) are refused; ``trust_pickle=True`` lifts both for files you trust.
A truncated or corrupt file is named in the error, and non-finite weights are refused unless
``allow_nonfinite=True``.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models import CLIP, CLIPConfig, load_model
from ..models.io import check_finite, read_safetensors
from ..tokenizer import VOCAB_SIZE, CLIPTokenizer
from ..transforms import EvalTransform
from . import openclip_models
from .hf_layouts import config_from_hf, hf_rules
from .keymap import import_state, load_into
from .onnx_export import onnx_export_reason
from .openclip_layout import IGNORED, config_from_openclip, is_openclip_state, openclip_rules
from .preprocess import preprocess_for
from .text_tokenizers import CausalLMTokenizer, HFTokenizer, MissingTokenizer, has_tokenizer_files

logger = logging.getLogger(__name__)

FORMATS = {
    "hf-clip": "Hugging Face CLIPModel directory (config.json + model.safetensors)",
    "hf-siglip": "Hugging Face SiglipModel directory (config.json + model.safetensors)",
    "openclip": "OpenCLIP state dict or training checkpoint (.safetensors/.pt/.bin) + its model config JSON or "
                "model_name",
    "openai": "original OpenAI CLIP checkpoint (TorchScript archive, with trust_pickle=True, or state dict)",
    "clipforge": "clipforge model/checkpoint/run directory (model_config.json + model.safetensors)",
    "hf-hub": "hf-hub:ORG/NAME, a Hugging Face Hub repository in one of the directory formats",
    "pivot": "directory written by clipforge.models.pivot.save_pivot (CLIP + sentence encoder + projection, uCLIP)",
}
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")
TRUST_HINT = ("pass trust_pickle=True (CLI --trust-pickle; train config init_trust_pickle=true) only if you trust "
              "where the file came from")
# the run name open_clip_train gives by default: DATE-TIME-model_NAME-lr_LR-b_BATCH-j_WORKERS-p_PRECISION
RUN_NAME = re.compile(r"^\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2}-model_(?P<model>.+?)-lr_.+-b_\d+-j_\d+-p_[^-]+$")


def _formats_help() -> str:
    # the model-name note lives here, not in FORMATS, so that it reaches every message that lists the formats
    return "; ".join(f"{k}: {v}" for k, v in FORMATS.items()) + (
        ". A model name such as 'ViT-B-32' or 'tiny' is an architecture, not weights: clipforge.create_model(NAME) "
        "builds it untrained (clipforge.list_models() names them), and pretrained weights load from a file, a "
        "directory or 'hf-hub:ORG/NAME'")


@dataclass
class Checkpoint:
    """A state dict and what the file said about itself."""

    state: dict[str, Tensor]
    torchscript: bool = False
    run_name: str | None = None  # OpenCLIP training checkpoints: {"epoch", "name", "state_dict", "optimizer"}
    training_checkpoint: bool = False


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> Checkpoint:
    """The tensors of a safetensors file, a (weights-only) pickle or, with ``trust_pickle``, a TorchScript archive."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return Checkpoint(read_safetensors(path))
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at '{path}'")
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        if not trust_pickle:
            raise ValueError(f"'{path}' is a TorchScript archive: loading it compiles and runs the code inside it "
                             f"(torch.jit.load), so it is refused by default. OpenAI's original CLIP files are such "
                             f"archives; {TRUST_HINT}")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise ValueError(f"'{path}' is a damaged TorchScript archive ({str(e).splitlines()[0]}): it is truncated "
                             "or corrupt; fetch or copy it again") from None
        return Checkpoint(dict(module.state_dict()), torchscript=True)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if trust_pickle or "Weights only load failed" not in str(e):
            raise ValueError(f"'{path}' cannot be read as a PyTorch checkpoint ({str(e).splitlines()[0]}): it is "
                             "truncated or corrupt, or not a checkpoint; fetch or copy it again") from None
        raise ValueError(
            f"'{path}' could not be read with torch.load(weights_only=True): {str(e).splitlines()[0]}. It holds more "
            f"than tensors, and unpickling it runs code; {TRUST_HINT}"
        ) from None
    except Exception as e:  # a truncated zip (RuntimeError), a cut pickle stream (EOFError), ...
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"'{path}' cannot be read as a PyTorch checkpoint ({first}): it is truncated or corrupt, or "
                         "not a checkpoint; fetch or copy it again") from None
    ckpt = Checkpoint({})
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        ckpt.training_checkpoint = True  # an OpenCLIP training checkpoint
        ckpt.run_name = obj["name"] if isinstance(obj.get("name"), str) else None
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"'{path}' does not hold a state dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    ckpt.state = obj
    return ckpt


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """Tensors of a safetensors file, a (weights-only) pickle or, with ``trust_pickle``, a TorchScript archive."""
    return read_checkpoint(path, trust_pickle).state


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


def load_hf_dir(directory: Path, trust_pickle: bool = False) -> tuple[CLIP, Any, Any]:
    hf = json.loads((directory / "config.json").read_text())
    family = hf.get("model_type")
    file = _weights_file(directory, ("model.safetensors", "pytorch_model.bin"))
    sd = read_state_dict(file, trust_pickle)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    cfg = config_from_hf(hf, sd)
    model = _build(cfg, import_state(hf_rules(cfg, family), sd, str(file)), str(file))
    if family == "siglip":
        tok = (HFTokenizer(directory, cfg.text.context_length) if has_tokenizer_files(directory)
               else MissingTokenizer(directory, "SigLIP uses its own SentencePiece tokenizer"))
    else:
        tok = _clip_tokenizer(directory, cfg)
    return model, tok, preprocess_for(directory, family, cfg.vision.image_size)


def _find_model_config(file: Path) -> tuple[dict, str] | None:
    for cand in (file.with_suffix(".json"), file.parent / "open_clip_config.json"):
        if cand.exists():
            d = json.loads(cand.read_text())
            return d.get("model_cfg", d), f"the model config '{cand}'"  # open_clip_config.json nests it under model_cfg
    return None


def _training_run_model(file: Path, run_name: str | None) -> tuple[str, str, bool] | None:
    """(model name, where it was read, certain) for an OpenCLIP training checkpoint, from its run's params.txt
    (``logs/NAME/params.txt`` beside ``checkpoints/``) or the default run name stored in the checkpoint."""
    params = file.parent.parent / "params.txt" if file.parent.name == "checkpoints" else None
    if params is not None and params.exists():
        args = dict(line.split(": ", 1) for line in params.read_text().splitlines() if ": " in line)
        if "model" in args:
            name = args["model"].strip()
            if args.get("force_quick_gelu", "False").strip() == "True" and not name.endswith("-quickgelu"):
                name += "-quickgelu"
            return name, f"the training run's '{params}'", True
    m = RUN_NAME.match(run_name or "")
    if m:
        return m.group("model"), f"the run name '{run_name}' stored in the checkpoint", False
    return None


def ambiguity_message(path: Path, why: str) -> str:
    return (f"'{path}' is an OpenCLIP/OpenAI-layout state dict and {why}. Its weights cannot show the activation "
            "(OpenAI's models and OpenCLIP's *-quickgelu ones use QuickGELU, OpenCLIP's others GELU) or the number of "
            "heads, and a wrong guess changes every embedding. Say which model it is: model_name='ViT-B-32' (CLI "
            "--model-name, train config init_model_name; the names: clipforge.interop.openclip_models.names()), "
            "openai=True (CLI --openai) for OpenAI's own weights, or model_config= (CLI --model-config) with the "
            "OpenCLIP model config JSON")


def resolve_openclip(path: Path, ckpt: Checkpoint, model_config: dict | None, model_name: str | None,
                     openai: bool | None) -> tuple[dict | None, bool, str]:
    """(OpenCLIP model config or None, OpenAI reading, where it came from) for an OpenCLIP-layout state dict."""
    given = [k for k, v in (("model_config", model_config), ("model_name", model_name)) if v is not None]
    if len(given) > 1 or (given and openai):
        raise ValueError(f"give one of model_config=, model_name= and openai=True for '{path}', not "
                         f"{' and '.join(given + (['openai=True'] if openai else []))}")
    if model_config is not None:
        return model_config, False, "the given model_config"
    if model_name is not None:
        return openclip_models.model_config(model_name), False, f"the OpenCLIP model '{model_name}'"
    if openai:
        return None, True, "openai=True"
    beside = _find_model_config(path)
    if beside is not None:
        return beside[0], False, beside[1]
    if openai is False:
        raise ValueError(ambiguity_message(path, "openai=False was given but no model config or model name"))
    if ckpt.torchscript:
        return None, True, "a TorchScript archive (OpenAI's format)"
    if any(k in ckpt.state for k in OPENAI_METADATA):
        return None, True, f"OpenAI's metadata entries ({', '.join(k for k in OPENAI_METADATA if k in ckpt.state)})"
    if ckpt.training_checkpoint:
        found = _training_run_model(path, ckpt.run_name)
        if found is not None:
            name, where, certain = found
            if not certain:
                logger.warning("'%s': OpenCLIP model '%s' read from %s; a run trained with --force-quick-gelu does "
                               "not record that there: pass model_name='%s-quickgelu' if it was", path, name, where,
                               name)
            return openclip_models.model_config(name), False, f"the OpenCLIP model '{name}' (from {where})"
        raise ValueError(ambiguity_message(path, f"an OpenCLIP training checkpoint whose run name "
                                                 f"({ckpt.run_name!r}) does not name its model and no params.txt is "
                                                 "beside its checkpoints/ folder"))
    raise ValueError(ambiguity_message(path, "no model config is beside it (open_clip_config.json or "
                                             f"{path.with_suffix('.json').name})"))


def load_openclip(sd: dict[str, Tensor], source: str, model_config: dict | None, openai: bool,
                  what: str = "the OpenCLIP model config") -> CLIP:
    sd = {k: v for k, v in sd.items() if k not in IGNORED}
    cfg = config_from_openclip(sd, model_config, openai=openai, what=what)
    return _build(cfg, import_state(openclip_rules(cfg), sd, source, ignore=IGNORED), source)


def load(source: str | Path, model_config: str | Path | dict | None = None, trust_pickle: bool = False,
         openai: bool | None = None, model_name: str | None = None,
         allow_nonfinite: bool = False) -> tuple[CLIP, Any, Any]:
    """Load any supported checkpoint; see the module docstring for the formats.

    For OpenCLIP/OpenAI-layout state dicts, what the weights cannot show comes from
    ``model_config`` (an OpenCLIP model config, dict or JSON path), ``model_name`` (an OpenCLIP
    model name such as ``ViT-B-32`` or ``ViT-B-32-quickgelu``) or ``openai=True`` (OpenAI's
    reading: quick_gelu, 64-channel heads); without them, from the files (see the module
    docstring), and an undecidable file is refused. ``trust_pickle``: allow full unpickling and
    TorchScript archives (both run code). ``allow_nonfinite``: load weights holding NaN/inf,
    with a warning, instead of refusing them.
    """
    if isinstance(source, str) and source.startswith("hf-hub:"):
        from .hub import download

        return load(download(source[len("hf-hub:"):]), model_config, trust_pickle, openai, model_name,
                    allow_nonfinite)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"'{source}' does not exist. clipforge.load reads: {_formats_help()}")
    reason = onnx_export_reason(path)
    if reason:
        raise ConfigError(f"{reason}. clipforge.load reads: {_formats_help()}")
    if isinstance(model_config, (str, Path)):
        model_config = json.loads(Path(model_config).read_text())
        model_config = model_config.get("model_cfg", model_config)
    if path.is_dir():
        # OpenCLIP's hf-hub layout; hub repositories may also hold a transformers config.json (then that model is
        # read) or timm's config.json (no model_type: the OpenCLIP files are the model)
        hf_type = json.loads((path / "config.json").read_text()).get("model_type") if (path / "config.json").exists() \
            else None
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if (path / name).exists() and hf_type not in ("clip", "siglip"):
                return load(path / name, model_config, trust_pickle, openai, model_name, allow_nonfinite)
        if model_name is not None or model_config is not None or openai is not None:
            raise ValueError(f"model_name=, model_config= and openai= describe OpenCLIP/OpenAI state dicts; '{path}' "
                             "is a directory that carries its own architecture, so leave them out")
        return _load_dir(path, trust_pickle, allow_nonfinite)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"'{path.name}' is not a weights file ({', '.join(WEIGHT_SUFFIXES)}). clipforge.load "
                         f"reads: {_formats_help()}")
    ckpt = read_checkpoint(path, trust_pickle)
    if not is_openclip_state(ckpt.state):
        raise ValueError(f"'{path}' holds a state dict of no known layout (first keys: {list(ckpt.state)[:4]}). "
                         f"clipforge.load reads: {_formats_help()}")
    cfg, is_openai, what = resolve_openclip(path, ckpt, model_config, model_name, openai)
    logger.info("'%s': architecture details not in the weights from %s", path, what)
    model = load_openclip(ckpt.state, str(path), cfg, is_openai, what)
    check_finite(model, str(path), allow_nonfinite)
    return model, _clip_tokenizer(None, model.cfg), EvalTransform(model.image_size)


def _load_dir(path: Path, trust_pickle: bool, allow_nonfinite: bool) -> tuple[Any, Any, Any]:
    if (path / "pivot.json").exists():  # uCLIP: the text side is a sentence encoder that reads raw text
        from ..models.pivot import load_pivot, texts_as_is

        model = load_pivot(path, allow_nonfinite=allow_nonfinite)
        return model, texts_as_is, EvalTransform(model.image_size)
    if (path / "model_config.json").exists() or (path / "checkpoints" / "latest.json").exists():
        model = load_model(path, allow_nonfinite=allow_nonfinite)
        if getattr(model.cfg, "lm", None) is not None:  # LLM2CLIP: the causal LM's own tokenizer
            lm = model.cfg.lm
            tokenizer = CausalLMTokenizer(lm.path, model.context_length, lm.gguf_file)
            return model, tokenizer, EvalTransform(model.image_size)
        if getattr(model.cfg, "lvlm", None) is not None:  # the LVLM: its causal LM's own tokenizer
            lm = model.cfg.lvlm
            tokenizer = CausalLMTokenizer(lm.path, model.context_length, lm.gguf_file)
            return model, tokenizer, EvalTransform(model.image_size)
        if model.cfg.hf_text is not None:
            return model, HFTokenizer(model.cfg.hf_text.path, model.context_length), EvalTransform(model.image_size)
        return model, _clip_tokenizer(None, model.cfg), EvalTransform(model.image_size)
    if (path / "config.json").exists():
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type in ("clip", "siglip"):
            model, tokenizer, preprocess = load_hf_dir(path, trust_pickle)
            check_finite(model, str(path), allow_nonfinite)
            return model, tokenizer, preprocess
        raise ValueError(f"'{path}/config.json' has model_type '{model_type}'; clipforge.load reads: {_formats_help()}")
    raise ValueError(f"'{path}' is a directory in no known format. clipforge.load reads: {_formats_help()}")
