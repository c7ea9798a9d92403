"""Typed configuration of a training run.

Dataclasses validated by OmegaConf's structured configs: a YAML file supplies any subset of
fields and ``key=value`` overrides on the command line (``lr=3e-4 data.train_size=50000
loss.siglip=1.0``) are merged on top, with type checking and a clear error for unknown keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError, MissingInputError

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
STRATEGIES = ("ddp", "fsdp")  # distributed.strategy


@dataclass
class DataConfig:
    dataset: str = "shapes"
    train_size: int = 20_000  # number of training samples (shapes renders them deterministically)
    eval_size: int = 500  # samples per evaluation split
    seed: int = 0  # data seed (scene sampling); the run seed drives order and augmentation
    num_workers: int = 0  # DataLoader workers; 0 keeps both cores for compute on small machines
    augment: bool = False  # random resized crop / flip / jitter for images that go through PIL
    # negative captions per sample, delivered only when a loss term reads them (hard_negative, degla_*)
    hard_negatives: int = 2
    # positive captions per sample, delivered only when a loss term reads them (multi_positive): drawn from
    # the sample's captions ("captions": its other captions, e.g. LaCLIP rewrites) or from the sentences of
    # its longest caption ("subcaptions": DreamLIP's sub-captions of a long caption), or the first sentence
    # of its longest caption ("first_sentence": Long-CLIP's short caption, with positives=1)
    positives: int = 2
    positive_source: str = "captions"
    # CLIP-IN's negative images per sample, delivered only when a loss term reads them (hard_negative with
    # negative_images=true): edited copies of the image (a swapped color, a removed object) re-rendered from
    # the scene's object list (shapes, shapes_long), so the caption no longer matches
    negative_images: int = 1
    # which of the dataset's negative types to draw from (shapes: color, shape, count, relation, swap); [] = all
    negative_types: list[str] = field(default_factory=list)
    # frozen teacher models (checkpoint or run directories) whose embeddings of the training set are
    # stored once and delivered with the batches, only when a loss term reads them (distill_kl, hycd, dclip)
    teachers: list[str] = field(default_factory=list)
    teacher_cache: str | None = None  # where the embeddings are stored; default <out_dir>/teacher_cache
    # MobileCLIP's reinforced dataset (clipforge data reinforce): K stored augmentations, synthetic captions and
    # teacher embeddings per augmentation and caption; each step replays one stored augmentation (train/reinforce.py)
    reinforced: str | None = None
    # the second view of each image, made only when a loss term reads it (simclr): a random resized crop
    # covering view_scale of the image plus color jitter of strength view_jitter
    view_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    view_jitter: float = 0.4
    # which caption of a sample a step uses: random | first | longest (Long-CLIP's long caption) | auto (first
    # when a loss term reads hard negatives, which are written from a sample's first caption; random otherwise)
    caption_policy: str = "auto"
    # caption SOURCES per step (LaCLIP, ALIP, "CLIP with Quality Captions"): "" = the dataset's captions;
    # e.g. "original=1,rewrites=1" draws the original caption or one of its stored rewrites
    caption_sources: str = ""
    # where the rewrites come from: "" none; "rule" = clipforge's offline RuleRewriter, computed once and
    # stored next to the data (or in <out_dir> for datasets without a directory); or a sidecar file path
    # (with a loss term that reads synthetic captions, alip, the rewrites are its synthetic captions and the
    # step's caption stays the original one unless data.caption_sources says otherwise)
    rewrites: str = ""
    # keep only captions in these languages, for corpora that tag them (emoji: en, es, ja, ... 14 in all);
    # [] = every caption. e.g. data.languages=[en] trains an English CLIP (the pivot of uCLIP alignment)
    languages: list[str] = field(default_factory=list)
    # the shard directory of a built corpus or of data.dataset=shards (default for corpora: $CLIPFORGE_DATA/NAME)
    root: str | None = None
    # stream the shards of data.dataset (a corpus name or shards) with clipforge.data.streaming instead of
    # indexing them: endless epochs, reshuffled per epoch; data.train_size is not used; resume is exact
    # with the same data.num_workers
    streaming: bool = False
    shuffle_buffer: int = 1000  # records per worker in the streaming shuffle buffer
    resampled: bool = False  # streaming: draw shards with replacement instead of epochs
    # caption noise (clipforge.data.caption_noise, GA-DMS's setting): the fraction of training samples whose
    # captions get a wrong attribute/object word and/or inserted irrelevant words; evaluation stays clean
    caption_noise: float = 0.0
    caption_noise_kinds: list[str] = field(default_factory=lambda: ["wrong", "irrelevant"])


@dataclass
class DistributedConfig:
    # processes of one data-parallel run (gloo on CPU): `clipforge train distributed.nproc=2` starts them
    # itself; under torchrun (which sets WORLD_SIZE) leave it at 1. batch_size stays the global batch.
    # See clipforge.train.distributed
    nproc: int = 1
    timeout_minutes: float = 30.0  # how long a rank waits in a collective for the others before failing
    # ddp: replicated weights, averaged gradients; fsdp: weights, gradients and optimizer state sharded over the
    # ranks (FSDP2, clipforge.train.fsdp) and sharded checkpoints (torch.distributed.checkpoint)
    strategy: str = "ddp"
    reshard_after_forward: bool = True  # fsdp: free each block's gathered weights after its forward (less memory)
    cpu_offload: bool = False  # fsdp on CUDA: sharded weights and optimizer state in host memory
    # ddp: average gradients with bucketed all-reduces launched from gradient hooks during the backward pass
    # (null: on CUDA only; true also on CPU, where it is tested against the plain path)
    overlap: bool | None = None


@dataclass
class TrainConfig:
    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # loss terms and their weights, e.g. {"clip": 1.0} or {"siglip": 1.0}; see clipforge.losses.available()
    loss: dict[str, Any] = field(default_factory=lambda: {"clip": 1.0})
    batch_size: int = 128
    accum_steps: int = 1  # micro-batches per optimizer step (features cached: exact full-batch loss)
    steps: int = 1000  # optimizer steps
    lr: float = 1e-3
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float | None = 1.0  # max global grad norm; null disables
    # bf16 autocast (about 4x faster matmuls on CPUs with AVX-512/AMX, several times slower on AVX2-only ones: the
    # run's log says so), fp32, fp16 (GPUs, GradScaler), or auto (bf16 where it is fast, else fp32; train/device.py)
    precision: str = "bf16"
    # where the run computes: auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps; every choice that follows
    # from it (autocast dtype, loss scaling, pinned memory, TF32, nccl/gloo, attention path) is in train/device.py
    device: str = "auto"
    seed: int = 0
    grad_checkpointing: bool = False
    # start from these weights instead of a random init: any source clipforge.load reads (a clipforge
    # run/model directory, a Hugging Face CLIP/SigLIP directory, OpenCLIP or OpenAI weights); the
    # architecture and tokenizer come from it and `model`/`model_overrides` are ignored
    init_from: str | None = None
    # what clipforge.load needs for some init_from / init_vision_from sources: the OpenCLIP model name of a state
    # dict without a config beside it (e.g. ViT-B-32, ViT-B-32-quickgelu), the opt-in to full unpickling and
    # TorchScript archives (both run code from the file), and loading weights that hold NaN/inf
    init_model_name: str | None = None
    init_vision_model_name: str | None = None
    init_trust_pickle: bool = False
    init_allow_nonfinite: bool = False
    # Long-CLIP's knowledge-preserved stretching (clipforge.models.long_clip) of the text positions of the built or
    # init_from model before training: factor > 1 keeps the first long_context_keep positions and interpolates the
    # rest factor-fold (77 -> 248 with keep 20, factor 4); the tokenizer then takes the stretched context length
    long_context_factor: int = 1
    long_context_keep: int = 20
    # copy only the image tower from this checkpoint into the configured model (whose vision config must
    # match): ProCLIP's first stage puts a pretrained language model beside a trained CLIP's image tower
    init_vision_from: str | None = None
    # parameter-name patterns (fnmatch): freeze these / train only these (see clipforge.train.freeze);
    # LiT: freeze=[text.*]; projection-only alignment (uCLIP): trainable=[visual.proj, text.proj, logit_scale]
    freeze: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    # momentum of the EMA copy of the model (DeGLA: 0.996); kept only when a loss term reads ema_* features
    ema_momentum: float = 0.996
    log_every: int = 10
    # besides metrics.jsonl, report every logged number to: tensorboard (event files in out_dir) and/or wandb
    # (offline mode); rank 0 only. See clipforge.train.report
    report_to: list[str] = field(default_factory=list)
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 250  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    resume: str | None = None  # "latest" or a checkpoint directory
    max_seconds: float | None = None  # stop (and checkpoint) after this much training time
    stop_at: int | None = None  # pause (and checkpoint) at this step; the schedule still spans `steps`
    progress: bool = True

    def _check_term_data_requirements(self) -> None:
        """Data settings a loss term declares it needs (``requires_data``, e.g. Long-CLIP's long caption
        and its first sentence), checked before anything is built."""
        from collections.abc import Mapping

        from ..losses import LOSSES

        for name, spec in self.loss.items():
            kind = spec.get("term", name) if isinstance(spec, Mapping) else name
            required = getattr(LOSSES.get(kind), "requires_data", {}) if kind in LOSSES else {}
            wrong = {k: v for k, v in required.items() if getattr(self.data, k) != v}
            if wrong:
                raise ConfigError(f"loss {name} needs " + " ".join(f"data.{k}={v}" for k, v in required.items())
                                 + f" (got {', '.join(f'data.{k}={getattr(self.data, k)}' for k in wrong)}); set them")

    def validate(self) -> TrainConfig:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got '{self.precision}'")
        from .device import parse_device

        parse_device(self.device)
        for name, value in {
            "batch_size": self.batch_size,
            "accum_steps": self.accum_steps,
            "steps": self.steps,
        }.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.batch_size % self.accum_steps:
            raise ConfigError(f"batch_size {self.batch_size} must be divisible by accum_steps {self.accum_steps}")
        if self.distributed.nproc < 1:
            raise ConfigError(f"distributed.nproc must be >= 1, got {self.distributed.nproc}")
        if self.distributed.strategy not in STRATEGIES:
            raise ConfigError(f"distributed.strategy must be one of {', '.join(STRATEGIES)}, got "
                              f"'{self.distributed.strategy}'")
        if self.distributed.timeout_minutes <= 0:
            raise ConfigError(f"distributed.timeout_minutes must be > 0, got {self.distributed.timeout_minutes}")
        if len(self.betas) != 2:
            raise ConfigError(f"betas needs two values, got {self.betas}")
        if not self.loss:
            raise ConfigError("loss needs at least one term, e.g. loss={clip: 1.0}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ConfigError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if self.data.caption_policy not in ("auto", "random", "first", "longest"):
            raise ConfigError(f"data.caption_policy must be auto, random, first or longest, got "
                              f"'{self.data.caption_policy}'")
        if self.data.streaming and self.data.dataset == "shapes":
            raise ConfigError("data.streaming reads webdataset shards: set data.dataset=shards data.root=DIR "
                             "(or a built corpus such as openclipart)")
        if self.data.languages and self.data.dataset == "shapes":
            raise ConfigError("data.languages filters the captions of built corpora (e.g. emoji); shapes has English "
                              "only")
        if self.data.languages and self.data.streaming:
            raise ConfigError("data.languages is not supported with data.streaming yet; use the map-style loader")
        if self.data.root and self.data.dataset == "shapes":
            raise ConfigError("data.root names a shard directory; shapes is rendered in memory (set data.dataset too)")
        if self.data.positives < 1:
            raise ConfigError(f"data.positives must be >= 1, got {self.data.positives}")
        if not 0.0 <= self.data.caption_noise <= 1.0:
            raise ConfigError(f"data.caption_noise is the fraction of training samples with noisy captions, in "
                              f"[0, 1]; got {self.data.caption_noise}")
        if self.data.caption_noise and (not self.data.caption_noise_kinds or set(self.data.caption_noise_kinds)
                                        - {"wrong", "irrelevant"}):
            raise ConfigError(f"data.caption_noise_kinds must be a non-empty subset of [wrong, irrelevant], got "
                              f"{list(self.data.caption_noise_kinds)}")
        if self.data.caption_noise and self.data.streaming:
            raise ConfigError("data.caption_noise wraps the map-style dataset; it is not supported with "
                              "data.streaming")
        if self.data.positive_source not in ("captions", "subcaptions", "first_sentence"):
            raise ConfigError(f"data.positive_source must be captions, subcaptions or first_sentence, got "
                             f"'{self.data.positive_source}'")
        self._check_term_data_requirements()
        if self.long_context_factor < 1 or self.long_context_keep < 0:
            raise ConfigError(f"long_context_factor must be >= 1 and long_context_keep >= 0, got "
                             f"{self.long_context_factor} and {self.long_context_keep}")
        if len(self.data.view_scale) != 2 or not 0 < self.data.view_scale[0] <= self.data.view_scale[1] <= 1:
            raise ConfigError(f"data.view_scale must be [low, high] with 0 < low <= high <= 1, got "
                              f"{self.data.view_scale}")
        if self.data.view_jitter < 0:
            raise ConfigError(f"data.view_jitter must be >= 0, got {self.data.view_jitter}")
        if self.data.hard_negatives < 1:
            raise ConfigError(f"data.hard_negatives must be >= 1, got {self.data.hard_negatives}")
        self._validate_numbers()
        if "shards" in self.data.dataset.split("+") and not self.data.root:
            raise ConfigError("data.dataset=shards reads a shard directory: set data.root=DIR (shards written by "
                              "`clipforge data convert SRC --out DIR` or `clipforge data build NAME --out DIR`)")
        return self

    def _validate_numbers(self) -> None:
        """Numbers that make no sense: named with the accepted range."""
        at_least = {"log_every": (self.log_every, 1), "warmup_steps": (self.warmup_steps, 0),
                    "eval_every": (self.eval_every, 0), "save_every": (self.save_every, 0),
                    "keep_checkpoints": (self.keep_checkpoints, 0), "data.train_size": (self.data.train_size, 1),
                    "data.eval_size": (self.data.eval_size, 1), "data.num_workers": (self.data.num_workers, 0),
                    "data.shuffle_buffer": (self.data.shuffle_buffer, 1),
                    "long_context_keep": (self.long_context_keep, 0)}
        hints = {"log_every": " (1 logs every step)", "eval_every": " (0: evaluate only at the end)",
                 "save_every": " (0: save only at the end)", "keep_checkpoints": " (0 keeps all)"}
        for name, (value, low) in at_least.items():
            if value < low:
                raise ConfigError(f"{name} must be >= {low}{hints.get(name, '')}, got {value}")
        positive = {"eps": self.eps}
        if self.grad_clip is not None:
            positive["grad_clip"] = self.grad_clip
        if self.max_seconds is not None:
            positive["max_seconds"] = self.max_seconds
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                off = " (grad_clip=null disables clipping)" if name == "grad_clip" else ""
                raise ConfigError(f"{name} must be a finite number > 0{off}, got {value}")
        for name, value in {"lr": self.lr, "weight_decay": self.weight_decay}.items():  # lr=0: weights stay as built
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1] (a fraction of lr), got {self.min_lr_ratio}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must both be in [0, 1), got {list(self.betas)}")
        if self.stop_at is not None and self.stop_at < 1:
            raise ConfigError(f"stop_at must be a step >= 1 (or null), got {self.stop_at}")
        weights = {}
        for name, value in self.loss.items():
            weight = value.get("weight", 1.0) if isinstance(value, dict) else value
            number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
            if not number or not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"loss weight of '{name}' must be a finite number >= 0, got {weight!r}; "
                                  "e.g. loss={clip: 1.0, siglip: 0.5}")
            weights[name] = weight
        if weights and not any(weights.values()):
            raise ConfigError(f"every loss weight is 0 ({weights}): give at least one term a weight > 0")


# Mappings that a layer states in full replace the default instead of merging into it:
# ``loss={siglip: 1.0}`` means SigLIP alone, while ``loss.siglip=1.0`` adds a term.
REPLACED_WHOLE = ("loss",)


def _merge_layer(base, layer, replace: tuple[str, ...]):
    for key in replace:
        if key in layer:
            OmegaConf.update(base, key, layer[key], merge=False)
            layer = OmegaConf.masked_copy(layer, [k for k in layer if k != key])
    return OmegaConf.merge(base, layer)


def _split_glued_terms(layer: dict) -> dict:
    """``loss={clip:1.0}`` (no space after the colon, as README and --help write it) reads in YAML as the key
    "clip:1.0" without a value: split such keys into name and weight, in every mapping replaced whole."""
    for key in REPLACED_WHOLE:
        value = layer.get(key) if isinstance(layer, dict) else None
        if not isinstance(value, dict):
            continue
        fixed = {}
        for name, weight in value.items():
            if weight is None and isinstance(name, str) and ":" in name:
                name, _, text = name.partition(":")
                try:
                    weight = yaml.safe_load(text)
                except yaml.YAMLError:
                    weight = text
            fixed[str(name).strip()] = weight
        layer[key] = fixed
    return layer


def _load_yaml(path: str | Path):
    """A config file as an OmegaConf layer; a missing, unreadable or broken file is a one-line ConfigError."""
    if not Path(path).is_file():
        raise MissingInputError(f"config file '{path}' does not exist or is not a file; give the path of a YAML file "
                          "with --config")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}; fix the file "
                          "(clipforge train --print-config prints a valid one)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text; give a YAML file with --config") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a YAML mapping of config fields (key: value), "
                          f"not a {type(data).__name__}")
    return OmegaConf.create(_split_glued_terms(data))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- ``key=value`` overrides, type-checked against :class:`TrainConfig`.

    ``loss={clip:1.0}`` and ``loss={clip: 1.0}`` mean the same (YAML needs the space; it is added here)."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = schema
        if path is not None:
            merged = _merge_layer(merged, _load_yaml(path), replace=REPLACED_WHOLE)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got {bad}")
            whole = {o.split("=", 1)[0].strip() for o in overrides} & set(REPLACED_WHOLE)
            layer = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
            merged = _merge_layer(merged, OmegaConf.create(_split_glued_terms(layer)), replace=tuple(whole))
        cfg: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).split("\n")[0]
        raise ConfigError(f"invalid training config: {key + ': ' if key else ''}{msg}") from None
    except yaml.YAMLError as e:  # an override whose value is not YAML, e.g. loss={clip: 1
        raise ConfigError(f"invalid training config override: {str(e).splitlines()[0]}; check the brackets and "
                          "quotes of the key=value overrides") from None
    return cfg.validate()


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: TrainConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
