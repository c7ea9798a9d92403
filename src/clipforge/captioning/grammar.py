"""Grammar fine-tuning of CLIP's text encoder against degenerate captions: Cho et al., 2022, "Fine-grained Image
Captioning with CLIP Reward" (Sec. 3.3).

A caption model optimized for CLIP-S alone learns to emit degenerate text (repeated words, unfinished or
scrambled sentences) that CLIP's bag-of-words-like text encoder still scores high. Cho et al. fine-tune the text
encoder with a grammar head ``g`` (a 2-layer MLP on the text feature) that tells real captions from negatives
made from them, without extra annotation, next to the usual image-text contrastive loss:

    L = L_CLIP(I, c) + L_grammar,   L_grammar = -[ log sigma(g(f_T(c))) + log(1 - sigma(g(f_T(c~)))) ]

with c~ a negative of c (BCE, positives and negatives averaged). The SCST reward then adds the grammar score:

    R(I, c) = CLIP-S(I, c) + lambda * sigma(g(f_T(c)))

Negatives (:func:`degenerate_caption`): ``repeat`` (a word or span repeated 2-3 times), ``truncate`` (the
caption cut after 1..n-1 words) and ``shuffle`` (the words permuted). The paper also inserts and swaps
words; here the three kinds the issue names are made. Simplifications: the head reads the projected text
embedding (what the judge scores with), the image tower stays frozen, and the temperature is the model's.
"""
from __future__ import annotations

import logging
import random
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tokenizer import get_tokenizer
from .metrics import clip_s

log = logging.getLogger(__name__)

KINDS = ("repeat", "truncate", "shuffle")


def degenerate_caption(caption: str, kind: str, rng: random.Random) -> str:
    """A negative of ``caption`` of the given ``kind`` (see the module docstring); always differs from it.

    Captions of fewer than 2 words are only ever made negative by ``repeat``."""
    if kind not in KINDS:
        raise ValueError(f"negative kind must be one of {', '.join(KINDS)}, got {kind!r}")
    words = caption.split()
    if not words:
        raise ValueError("cannot make a negative of an empty caption")
    if kind == "truncate" and len(words) >= 2:
        return " ".join(words[: rng.randint(1, len(words) - 1)])
    if kind == "shuffle" and len(set(words)) >= 2:
        perm = words[:]
        while perm == words:
            rng.shuffle(perm)
        return " ".join(perm)
    # repeat (also the fallback for captions too short to truncate or shuffle)
    start = rng.randrange(len(words))
    span = rng.randint(1, min(2, len(words) - start))
    times = rng.randint(2, 3)
    piece = words[start:start + span]
    return " ".join(words[:start] + piece * times + words[start + span:])


def degenerate_captions(captions: Sequence[str], rng: random.Random,
                        kinds: Sequence[str] = KINDS) -> tuple[list[str], list[str]]:
    """One negative per caption, of a kind drawn uniformly from ``kinds``; returns (negatives, kinds used)."""
    used = [rng.choice(list(kinds)) for _ in captions]
    return [degenerate_caption(c, k, rng) for c, k in zip(captions, used)], used


class GrammarHead(nn.Module):
    """g: a 2-layer MLP from a text embedding to one logit (grammatical or not)."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, text_features: Tensor) -> Tensor:
        return self.net(text_features).squeeze(-1)


def grammar_loss(positive_logits: Tensor, negative_logits: Tensor) -> Tensor:
    """L_grammar: binary cross-entropy, real captions labelled 1 and negatives 0, averaged over both."""
    logits = torch.cat([positive_logits, negative_logits])
    labels = torch.cat([torch.ones_like(positive_logits), torch.zeros_like(negative_logits)])
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def finetune_grammar(clip, captions: Sequence[str], images: Tensor | None = None, *, steps: int = 100,
                     batch_size: int = 32, lr: float = 1e-4, seed: int = 0, contrastive_weight: float = 1.0,
                     head: GrammarHead | None = None) -> tuple[GrammarHead, list[dict]]:
    """Fine-tune ``clip``'s text tower (in place) and a grammar head on ``captions`` and their negatives.

    ``images`` [N, 3, H, W], one per caption, add the image-text contrastive loss (weight ``contrastive_weight``)
    that keeps the text tower aligned with the frozen image tower; without them only L_grammar trains.
    Returns the head and the per-step losses."""
    if not captions:
        raise ValueError("finetune_grammar needs captions")
    if images is not None and images.shape[0] != len(captions):
        raise ValueError(f"{images.shape[0]} images for {len(captions)} captions: give one image per caption")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tok = get_tokenizer(clip.context_length)
    head = head or GrammarHead(int(clip.cfg.embed_dim))
    for name, p in clip.named_parameters():
        p.requires_grad_(name.startswith("text."))
    params = [p for p in clip.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history = []
    clip.train()
    for step in range(steps):
        idx = [rng.randrange(len(captions)) for _ in range(min(batch_size, len(captions)))]
        pos = [captions[i] for i in idx]
        neg, _ = degenerate_captions(pos, rng)
        t_pos = clip.encode_text(tok(pos)).float()
        t_neg = clip.encode_text(tok(neg)).float()
        lg = grammar_loss(head(t_pos), head(t_neg))
        loss = lg
        record = {"step": step, "grammar": float(lg.detach())}
        if images is not None and contrastive_weight > 0:
            with torch.no_grad():
                v = clip.encode_image(images[idx]).float()
            logits = float(clip.scale().detach()) * F.normalize(v, dim=-1) @ F.normalize(t_pos, dim=-1).t()
            target = torch.arange(len(idx))
            lc = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
            loss = loss + contrastive_weight * lc
            record["contrastive"] = float(lc.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(record)
    clip.eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    return head.eval(), history


@torch.no_grad()
def grammar_scores(clip, head: GrammarHead, texts: Sequence[str]) -> Tensor:
    """sigma(g(f_T(c))): the probability the head gives each text of being a real caption."""
    tok = get_tokenizer(clip.context_length)
    return torch.sigmoid(head(clip.encode_text(tok(list(texts))).float()))


def clip_s_grammar_reward(judge, head: GrammarHead, weight: float = 1.0) -> Callable[[Tensor, list[str]], Tensor]:
    """The reward R(I, c) = CLIP-S(I, c) + ``weight`` * sigma(g(f_T(c))) for :func:`clipforge.captioning.scst_step`
    (``reward=``), with ``judge`` the grammar-fine-tuned CLIP."""
    tok = get_tokenizer(judge.context_length)

    @torch.no_grad()
    def reward(images: Tensor, texts: list[str]) -> Tensor:
        t = judge.encode_text(tok(texts)).float()
        return clip_s(t, judge.encode_image(images).float()) + weight * torch.sigmoid(head(t))

    return reward


__all__ = ["GrammarHead", "KINDS", "clip_s_grammar_reward", "degenerate_caption", "degenerate_captions",
           "finetune_grammar", "grammar_loss", "grammar_scores"]
