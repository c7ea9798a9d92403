"""Training the LLaVA-style LVLM (:mod:`clipforge.models.lvlm`) in three stages (``clipforge lvlm-train --stage``).

``caption`` -- the LVLM learns to caption ``shapes``: the next-token loss over a caption's tokens with the image
tokens prefixed (:meth:`~clipforge.models.lvlm.LVLM.caption_loss`). ``train_lm="full"`` trains the image tower,
projector and LM (a tiny random LM has to learn the language); ``"frozen"`` keeps the LM as it is (LLaVA's first
stage: projector alignment).

``discriminative`` -- "Discriminative Fine-tuning of LVLMs" (Ouali et al., CVPR 2025): the LVLM trained with
a contrastive and a next-token loss together, through soft prompting and LoRA adapters. With the image and text
embeddings x_i, y_i (last-token states of the summarizing prompts, normalized) and the learned scale t:

    L = L_CLIP(x, y; t) + lambda L_cap

where L_CLIP is CLIP's symmetric InfoNCE (:func:`clipforge.losses.clip.clip_loss`) and L_cap the caption loss.
Only the soft prompts (``soft_prompt_tokens`` per modality), the LoRA adapters (peft, on ``lora_targets``) and
the logit scale train. Simplification: the paper trains on pairs of variable length and granularity (short
captions for the contrast, long ones for the next-token loss); here both losses read the same ``shapes``
captions.

``unime`` -- UniME (Gu et al., 2025): first textual discriminative knowledge distillation (``kd_steps`` steps of
:func:`clipforge.losses.unime_kd.unime_kd_loss` between the LVLM's text embeddings and a teacher's), then
hard-negative-enhanced instruction tuning (``steps`` steps of :func:`clipforge.losses.unime_hardneg.
unime_hardneg_loss`, image->text and text->image, false negatives above s_pos + ``fn_beta`` left out, the
``hard_negatives`` hardest kept). Only LoRA adapters train, in both stages. The teacher is a causal LM directory
whose mean-pooled last states embed a caption (:func:`clipforge.models.llm_text.lm_pooled`), e.g. the caption
embedder ``clipforge lm-finetune`` writes; the paper's teacher is NV-Embed V2, a 7B LLM embedder.
Simplification: no instruction data (MMEB): the "instruction" is the summarizing prompt.

Every stage writes a clipforge model directory (``clipforge.load``, ``embed``, ``eval``, ``export``) and
``lvlm_train.json`` (configuration, loss per step, held-out caption loss before and after).
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from ..data import build_dataset
from ..errors import ConfigError
from ..interop.text_tokenizers import CausalLMTokenizer
from ..losses.clip import clip_loss
from ..losses.unime_hardneg import unime_hardneg_loss
from ..losses.unime_kd import unime_kd_loss
from ..models import create_model, load_model, save_model
from ..models.llm_text import lm_eos_token_id, lm_pooled, load_causal_lm
from ..models.lvlm import LVLM
from ..transforms import normalize_batch

log = logging.getLogger(__name__)

STAGES = ("caption", "discriminative", "unime")


@dataclass
class LVLMTrainConfig:
    stage: str = "caption"
    lm: str = ""  # a Hugging Face causal LM directory (a new LVLM; without init_from)
    gguf_file: str | None = None
    layers: int | None = None  # keep the LM's first N decoder layers
    model: str = "lvlm-tiny"  # the architecture of a new LVLM (a name or a JSON file)
    init_from: str | None = None  # a saved LVLM (the previous stage's output) to continue from
    dataset: str = "shapes"
    train_size: int = 2000
    eval_size: int = 128  # held-out samples for the caption loss before/after
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    train_lm: str = "full"  # caption stage: "full" or "frozen"
    soft_prompt_tokens: int = 4  # discriminative
    lora_rank: int = 8  # discriminative, unime
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    caption_weight: float = 1.0  # discriminative: lambda
    teacher: str = ""  # unime: a causal LM directory whose mean-pooled states are the teacher's text embeddings
    teacher_gguf_file: str | None = None
    teacher_layers: int | None = None
    kd_steps: int = 50  # unime: distillation steps before the hard-negative steps
    kd_temperature: float = 0.05
    temperature: float = 0.05  # unime: the hard-negative InfoNCE's tau
    hard_negatives: int = 8  # unime: k
    fn_beta: float = 0.1  # unime: false-negative margin

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        if self.stage not in STAGES:
            raise ConfigError(f"unknown LVLM training stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        if self.train_lm not in ("full", "frozen"):
            raise ConfigError(f"train_lm must be 'full' or 'frozen', got {self.train_lm!r}")
        if self.steps < 0 or self.kd_steps < 0 or self.batch_size < 2 or self.lr <= 0:
            raise ConfigError(f"LVLM training needs steps >= 0, kd_steps >= 0, batch_size >= 2 and lr > 0; got "
                              f"{self.steps}, {self.kd_steps}, {self.batch_size}, {self.lr}")
        if not self.lm and not self.init_from:
            raise ConfigError("give the language model (--lm DIR, a Hugging Face causal LM directory) for a new LVLM, "
                              "or --init-from a saved LVLM to continue from")
        if self.stage == "unime" and self.kd_steps and not self.teacher:
            raise ConfigError("the unime stage distills from a teacher: give --teacher DIR (a causal LM directory, "
                              "e.g. the output of clipforge lm-finetune), or --kd-steps 0 to skip the distillation")


def build_lvlm(cfg: LVLMTrainConfig) -> LVLM:
    """A new LVLM (``cfg.model`` on ``cfg.lm``) or the one saved at ``cfg.init_from``, with the stage's soft prompts."""
    soft = cfg.soft_prompt_tokens if cfg.stage == "discriminative" else 0
    if not cfg.init_from:
        section = {"path": cfg.lm, "gguf_file": cfg.gguf_file, "layers": cfg.layers, "soft_prompt_tokens": soft}
        model = create_model(cfg.model, seed=cfg.seed, lvlm=section)
        if not isinstance(model, LVLM):
            raise ConfigError(f"model '{cfg.model}' is not an LVLM (its config has no lvlm section); use lvlm-tiny")
        return model
    prev = load_model(cfg.init_from)
    if not isinstance(prev, LVLM):
        raise ConfigError(f"'{cfg.init_from}' holds a {type(prev).__name__}, not an LVLM; give the output of "
                          "clipforge lvlm-train")
    if prev.cfg.lvlm.lora_rank:
        prev.merge_lora()  # the new stage's adapters start from the merged weights
    if soft and prev.soft_prompt_image is None:
        d = prev.cfg.to_dict()
        d["lvlm"]["soft_prompt_tokens"] = soft
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = create_model(type(prev.cfg).from_dict(d))
        result = model.load_state_dict(prev.state_dict(), strict=False)
        if result.unexpected_keys or set(result.missing_keys) - {"soft_prompt_image", "soft_prompt_text"}:
            raise ConfigError(f"'{cfg.init_from}' does not match its own config: {result}")
        return model
    return prev


def load_pairs(dataset: str, split: str, size: int, seed: int, image_size: int) -> tuple[Tensor, list[list[str]]]:
    """uint8 images [N, 3, S, S] and each image's captions."""
    ds = build_dataset(dataset, split=split, size=size, seed=seed, image_size=image_size)
    items = [ds[i] for i in range(len(ds))]
    caps = [[it["captions"]] if isinstance(it["captions"], str) else list(it["captions"]) for it in items]
    return torch.stack([it["image"] for it in items]), caps


class TeacherEmbedder:
    """The teacher's text embeddings: mean-pooled last states of a (frozen) causal LM, cached by caption."""

    def __init__(self, path: str, gguf_file: str | None, layers: int | None, context_length: int):
        self.tokenizer = CausalLMTokenizer(path, context_length, gguf_file)
        self.lm = load_causal_lm(path, gguf_file, layers=layers).eval().requires_grad_(False)
        self.eos = lm_eos_token_id(self.lm.config)
        self.cache: dict[str, Tensor] = {}

    def __call__(self, texts: list[str]) -> Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if todo:
            for t, row in zip(todo, lm_pooled(self.lm, self.tokenizer(todo), self.eos, "mean")):
                self.cache[t] = row
        return torch.stack([self.cache[t] for t in texts])


def select_trainable(model: LVLM, cfg: LVLMTrainConfig) -> list[nn.Parameter]:
    """The stage's trainable parameters (module docstring); everything else is frozen."""
    if cfg.stage == "caption":
        model.requires_grad_(True)
        if cfg.train_lm == "frozen":
            model.lm.requires_grad_(False)
        model.logit_scale.requires_grad_(False)  # no contrast in this stage
        for p in (model.soft_prompt_image, model.soft_prompt_text):
            if p is not None:
                p.requires_grad_(False)
    else:
        model.requires_grad_(False)
        model.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)  # peft: only the adapters of the LM train
        if cfg.stage == "discriminative":
            for p in (model.soft_prompt_image, model.soft_prompt_text, model.logit_scale):
                p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def optimize(params: list[nn.Parameter], steps: int, lr: float, step_loss: Callable[[int], Tensor], name: str,
             losses: list[float]) -> None:
    """AdamW with linear warm-up (10%) and cosine decay over ``steps`` steps of ``step_loss(step)``."""
    if not steps:
        return
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    for step in range(steps):
        loss = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            log.info("%s step %d/%d: loss %.4f", name, step + 1, steps, losses[-1])


@torch.no_grad()
def held_out_caption_loss(model: LVLM, tokenizer: CausalLMTokenizer, images: Tensor, captions: list[list[str]],
                          batch: int = 32) -> float:
    """Mean caption loss over held-out images, each with its first caption."""
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(images), batch):
        n = len(images[i:i + batch])
        total += float(model.caption_loss(normalize_batch(images[i:i + batch]),
                                          tokenizer([c[0] for c in captions[i:i + batch]]))) * n
    model.train(was)
    return total / len(images)


def train_lvlm(cfg: LVLMTrainConfig, out: str | Path) -> dict:
    """Run ``cfg.stage`` and save the LVLM to ``out`` (module docstring); returns the report."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = build_lvlm(cfg)
    sec = model.cfg.lvlm
    tokenizer = CausalLMTokenizer(sec.path, model.context_length, sec.gguf_file)
    teacher = TeacherEmbedder(cfg.teacher, cfg.teacher_gguf_file, cfg.teacher_layers, model.context_length) \
        if cfg.stage == "unime" and cfg.kd_steps else None
    images, captions = load_pairs(cfg.dataset, "train", cfg.train_size, 0, model.image_size)
    val_images, val_captions = load_pairs(cfg.dataset, "val", cfg.eval_size, 0, model.image_size)
    before = held_out_caption_loss(model, tokenizer, val_images, val_captions)
    params = select_trainable(model, cfg)
    model.train()

    def draw() -> tuple[Tensor, Tensor]:
        idx = rng.sample(range(len(images)), min(cfg.batch_size, len(images)))
        return normalize_batch(images[idx]), tokenizer([rng.choice(captions[i]) for i in idx])

    losses: list[float] = []
    kd_losses: list[float] = []
    if cfg.stage == "caption":
        optimize(params, cfg.steps, cfg.lr, lambda s: model.caption_loss(*draw()), "caption", losses)
    elif cfg.stage == "discriminative":
        def step(_):
            x, ids = draw()
            contrast = clip_loss(model.encode_image(x), model.encode_text(ids), model.scale())
            return contrast + cfg.caption_weight * model.caption_loss(x, ids) if cfg.caption_weight else contrast

        optimize(params, cfg.steps, cfg.lr, step, "discriminative", losses)
    else:
        pool = sorted({c for caps in captions for c in caps})

        def kd_step(_):
            texts = rng.sample(pool, min(cfg.batch_size, len(pool)))
            student = model.encode_text(tokenizer(texts))
            return unime_kd_loss(student, torch.nn.functional.normalize(teacher(texts), dim=-1), cfg.kd_temperature)

        def hn_step(_):
            x, ids = draw()
            xi, yt = model.encode_image(x), model.encode_text(ids)
            return 0.5 * (unime_hardneg_loss(xi, yt, cfg.temperature, cfg.fn_beta, cfg.hard_negatives)
                          + unime_hardneg_loss(yt, xi, cfg.temperature, cfg.fn_beta, cfg.hard_negatives))

        optimize(params, cfg.kd_steps, cfg.lr, kd_step, "unime distillation", kd_losses)
        optimize(params, cfg.steps, cfg.lr, hn_step, "unime hard negatives", losses)
    after = held_out_caption_loss(model, tokenizer, val_images, val_captions)
    if model.cfg.lvlm.lora_rank:
        model.merge_lora()  # a plain LVLM again: the next stage (or clipforge.load) needs no adapters
    out = Path(out)
    save_model(model.eval(), out)
    report = {"config": asdict(cfg), "losses": losses, "kd_losses": kd_losses,
              "val_caption_loss_before": before, "val_caption_loss_after": after,
              "trainable_parameters": sum(p.numel() for p in params)}
    (out / "lvlm_train.json").write_text(json.dumps(report, indent=2))
    log.info("lvlm %s: held-out caption loss %.3f -> %.3f; saved to %s", cfg.stage, before, after, out)
    return report
