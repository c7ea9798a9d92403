"""Setting up a training run: the model and its tokenizer, and the data pipeline.

``build_model`` makes the configured model (or loads ``init_from``), copies an image tower
(``init_vision_from``), and applies ``freeze``/``trainable``. ``build_loader`` makes the batches
the loop consumes: shards streamed (``data.streaming``) or a map-style dataset whose items carry
what the loss terms read, each input set up by its entry in :mod:`.inputs` (hard negatives,
positives, count counterfactuals, stored teacher embeddings, a second augmented view of each image,
synthetic captions and short tags, regions, ...), with the caption of each step drawn as
``data.caption_policy`` / ``data.caption_sources`` say.
:func:`token_outputs` decides whether the model is asked for token-level features.
"""
from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch

from ..data import build_dataset
from ..models import create_model
from ..tokenizer import get_tokenizer
from .config import TrainConfig
from .data import TrainItems, stream_train_loader, train_loader, view_transform
from .freeze import apply_freeze
from .inputs import (  # noqa: F401
    COUNTS,
    EMA_KEYS,
    FROM_DATASET,
    NEGATIVES,
    POSITIVES,
    PRODUCED,
    REGION_KEYS,
    SYNTHETIC,
    TAGS,
    TEACHER_KEYS,
    TOKEN_KEYS,
    VIEW2,
    DataContext,
    data_options,
)

logger = logging.getLogger(__name__)


def _needs_region_head(loss: dict, flag: str = "needs_region_head") -> bool:
    """Whether a configured loss term (by name, or by its ``term`` option) trains a region head (CLOC), or
    with ``flag="needs_tgmim"`` SyCoCa's TG-MIM branch."""
    from ..losses import LOSSES

    kinds = [v.get("term", k) if isinstance(v, dict) else k for k, v in loss.items()]
    return any(getattr(LOSSES.get(kind), flag, False) for kind in kinds if kind in LOSSES.names())


def check_model_parts(cfg: TrainConfig, model) -> None:
    """A loss term that trains a model part the model lacks (a model loaded with init_from) stops the run here."""
    from ..errors import ConfigError

    if _needs_region_head(cfg.loss) and getattr(model, "region_head", None) is None:
        raise ConfigError(f"the loss terms {sorted(cfg.loss)} train a region head, which this model has none of; "
                          "start from a model built with region_head=true (or without init_from, where clipforge "
                          "train adds one)")
    if _needs_region_head(cfg.loss, "needs_tgmim") and getattr(model, "tgmim", None) is None:
        raise ConfigError(f"the loss terms {sorted(cfg.loss)} need SyCoCa's TG-MIM branch of a CoCa model, which "
                          f"this {type(model).__name__} lacks; train a CoCa (model=coca-tiny) or one built with "
                          "tgmim=true")


def build_model(cfg: TrainConfig, say=logger.info):
    """(model, tokenizer) as configured; ``say`` reports notes (the loop silences it on ranks other than 0)."""
    if cfg.init_from:
        from ..interop import load  # any checkpoint of the ecosystem; its tokenizer comes with it

        model, tokenizer, _ = load(cfg.init_from, model_name=cfg.init_model_name, trust_pickle=cfg.init_trust_pickle,
                                   allow_nonfinite=cfg.init_allow_nonfinite)
        model.train()
    else:
        overrides = dict(cfg.model_overrides)
        if _needs_region_head(cfg.loss) and "region_head" not in overrides:  # CLOC trains a region head
            overrides["region_head"] = True
        if _needs_region_head(cfg.loss, "needs_tgmim") and "tgmim" not in overrides:  # SyCoCa: on a CoCa only
            from ..models import get_model_config
            from ..models.coca import CoCaConfig

            if isinstance(get_model_config(cfg.model), CoCaConfig):
                overrides["tgmim"] = True
        model = create_model(cfg.model, seed=cfg.seed, **overrides)
        if getattr(model.cfg, "lm", None) is not None:  # LLM2CLIP: the causal LM brings its own tokenizer
            from ..interop.text_tokenizers import CausalLMTokenizer

            tokenizer = CausalLMTokenizer(model.cfg.lm.path, model.context_length, model.cfg.lm.gguf_file)
        elif getattr(model.cfg, "lvlm", None) is not None:  # the LVLM: its causal LM's own tokenizer
            from ..interop.text_tokenizers import CausalLMTokenizer

            tokenizer = CausalLMTokenizer(model.cfg.lvlm.path, model.context_length, model.cfg.lvlm.gguf_file)
        elif model.cfg.hf_text is not None:  # a pretrained Hugging Face text tower brings its own tokenizer
            from ..interop.text_tokenizers import HFTokenizer

            tokenizer = HFTokenizer(model.cfg.hf_text.path, model.context_length)
        else:
            tokenizer = get_tokenizer(model.context_length)
    if cfg.long_context_factor > 1:  # Long-CLIP: stretch the text positions, tokenize to the longer context
        from ..models.long_clip import stretch_context

        model = stretch_context(model, cfg.long_context_keep, cfg.long_context_factor)
        tokenizer = get_tokenizer(model.context_length)
    if cfg.init_vision_from:
        copy_image_tower(model, cfg.init_vision_from, model_name=cfg.init_vision_model_name,
                         trust_pickle=cfg.init_trust_pickle, allow_nonfinite=cfg.init_allow_nonfinite)
    check_model_parts(cfg, model)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.freeze or cfg.trainable:
        n_train, n_total = apply_freeze(model, cfg.freeze, cfg.trainable)
        say(f"training {n_train:,} of {n_total:,} parameters (freeze={cfg.freeze}, trainable={cfg.trainable})")
    return model, tokenizer


def token_outputs(model, needs: set) -> bool:
    """Whether the loop asks the model for projected token features (``return_tokens``): only when a
    loss term reads ``image_tokens`` or ``text_tokens``; raises at start-up when the model cannot."""
    if not needs & set(TOKEN_KEYS):
        return False
    from ..models.text import TextTransformer

    if "return_tokens" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"the loss terms reading {sorted(needs & set(TOKEN_KEYS))} need token features, which a "
                         f"{type(model).__name__} model does not return; train them with a CLIP model")
    if not isinstance(model.text, TextTransformer):
        raise ValueError("token features (image_tokens/text_tokens) need clipforge's own text transformer, "
                         f"not a {type(model.text).__name__}")
    return True


def copy_image_tower(model, source: str, **load_options) -> None:
    """Load every ``visual.*`` tensor of ``source`` (any checkpoint clipforge.load reads, with ``load_options``)
    into ``model``."""
    from ..interop import load

    donor = {k: v for k, v in load(source, **load_options)[0].state_dict().items() if k.startswith("visual.")}
    own = {k: v for k, v in model.state_dict().items() if k.startswith("visual.")}
    missing, unexpected = sorted(set(own) - set(donor)), sorted(set(donor) - set(own))
    wrong = [f"{k} {tuple(donor[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(donor))
             if donor[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"init_vision_from={source}: its image tower does not fit the configured one "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}); "
                         "give the model the same vision config (model=... / model_overrides.vision)")
    with torch.no_grad():
        for k, v in donor.items():
            own[k].copy_(v)


def resolve_caption_policy(policy: str, needs: set) -> str:
    """``data.caption_policy``: "auto" is "first" (the caption hard negatives are written from)
    when a loss term reads hard negatives, "random" otherwise."""
    if policy != "auto":
        return policy
    return "first" if needs & {NEGATIVES, "ema_negative_text_features"} else "random"


def with_caption_sources(cfg: TrainConfig, dataset, out_dir: Path, needs: set):
    """(dataset with its caption sources, CaptionPolicy or None) for data.caption_sources / data.rewrites."""
    if not cfg.data.caption_sources and not cfg.data.rewrites:
        return dataset, None
    from ..data.captions import CaptionPolicy, SourcedCaptions

    # ALIP reads the rewrites as the synthetic caption beside the original one: the step's caption stays original
    policy = CaptionPolicy.parse(
        cfg.data.caption_sources or ("original=1" if SYNTHETIC in needs else "original=1,rewrites=1")
    )
    if needs & (set(TEACHER_KEYS) | {NEGATIVES, "ema_negative_text_features"}):
        raise ValueError("data.caption_sources draws captions from several sources; the loss terms "
                         f"{sorted(cfg.loss)} pair stored teacher embeddings or hard negatives with a dataset caption. "
                         "Use one or the other")
    rewrites = None
    if cfg.data.rewrites:
        from ..data.rewrites import RuleRewriter, load_rewrites, store_rewrites

        if cfg.data.rewrites == "rule":
            # next to the data for shard directories, else in the run directory; the name holds what selects the samples
            name = f"rewrites.rule.n{len(dataset)}.seed{cfg.data.seed}.parquet"
            path = Path(dataset.root) / f"{dataset.split}.{name}" if hasattr(dataset, "root") else out_dir / name
            rewrites = store_rewrites(dataset, RuleRewriter(), path, seed=cfg.data.seed)  # read back when stored
        else:
            rewrites = load_rewrites(cfg.data.rewrites, dataset)
    elif "rewrites" in policy.weights:
        raise ValueError("data.caption_sources names 'rewrites' but data.rewrites is empty: set data.rewrites=rule "
                         "(clipforge's offline rewriter, stored once next to the data) or a sidecar file")
    return SourcedCaptions(dataset, rewrites=rewrites), policy


def build_loader(cfg: TrainConfig, model, tokenizer, needs: set, out_dir: Path, start_step: int, stream_state=None,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False, terms=()):
    """The iterable of (micro-)batches from ``start_step`` on; with ``world_size > 1``, rank
    ``rank``'s share of them (a slice of every global batch, or its shards of the stream).
    ``terms``: the loss terms, for data inputs that read an option of theirs (MLCD's cluster file)."""
    micro = cfg.batch_size // cfg.accum_steps  # global micro-batch: world_size slices of it per step and micro-batch
    if cfg.data.streaming:  # webdataset shards streamed; the position is saved with each checkpoint
        if needs & FROM_DATASET:
            raise ValueError(f"data.streaming delivers images and captions only; the loss terms {sorted(cfg.loss)} "
                             f"need {sorted(needs & FROM_DATASET)}: train them with the map-style loader")
        loader = stream_train_loader(cfg.data, model.image_size, micro // world_size, cfg.seed, tokenizer,
                                     resolve_caption_policy(cfg.data.caption_policy, needs), stream_state,
                                     rank=rank, world_size=world_size)
    else:
        dataset = build_dataset(cfg.data.dataset, split="train", size=cfg.data.train_size, seed=cfg.data.seed,
                                image_size=model.image_size, **({"root": cfg.data.root} if cfg.data.root else {}),
                                **({"languages": list(cfg.data.languages)} if cfg.data.languages else {}))
        if cfg.data.caption_noise:  # GA-DMS's setting: a fraction of the training captions corrupted
            from ..data.caption_noise import NoisyCaptions

            dataset = NoisyCaptions(dataset, cfg.data.caption_noise, cfg.data.caption_noise_kinds,
                                    seed=cfg.data.seed)
        dataset, sources = with_caption_sources(cfg, dataset, out_dir, needs)
        if cfg.data.reinforced and not needs & set(TEACHER_KEYS):
            raise ValueError(f"data.reinforced holds teacher embeddings, which none of the loss terms "
                             f"{sorted(cfg.loss)} reads; add a distillation term "
                             "(e.g. loss={clip: 1.0, distill_kl: 1.0}) or drop it")
        # every data input a needed key refers to sets its TrainItems options (train/inputs.py's table)
        ctx = DataContext(cfg, frozenset(needs), model.image_size, Path(out_dir), dataset, tuple(terms),
                          view_transform)
        items = TrainItems(dataset, cfg.seed, model.image_size, augment=cfg.data.augment,
                           caption_policy=resolve_caption_policy(cfg.data.caption_policy, needs), sources=sources,
                           **data_options(ctx))
        loader = train_loader(items, micro, cfg.seed, start_batch=start_step * cfg.accum_steps,
                              num_batches=(cfg.steps - start_step) * cfg.accum_steps, tokenizer=tokenizer,
                              num_workers=cfg.data.num_workers, rank=rank, world_size=world_size,
                              accum_steps=cfg.accum_steps, pin_memory=pin_memory)
    return loader
