"""CgT-GAN: a caption generator trained adversarially against real captions with CLIP-based rewards.

Paper: Yu et al., "CgT-GAN: CLIP-guided Text GAN for Image Captioning" (ACM MM 2023). The generator
(here any SCST policy of :mod:`clipforge.captioning.scst`: the CoCa decoder or a MacCap decoder) sees real
images and is rewarded by

    r(c, I) = r_CLIP(c, I) + lambda * r_D(c),     r_D(c) = sigma(D(c))                            (reward)

where D is a discriminator trained to tell captions of an external text corpus (label 1) from generated
ones (label 0) with binary cross-entropy, and r_CLIP is one of the paper's two semantic rewards, with
unit CLIP embeddings t = E_T(c), v = E_I(I) and corpus sentences s_1..s_M:

- CLIP-cos:  r = cos(t, v)
- CLIP-agg:  r = cos(t, t_agg),  t_agg = normalize( sum_j a_j E_T(s_j) ),  a_j = softmax_j( cos(v, E_T(s_j)) / tau )

(CLIP-agg aligns the caption with a text embedding aggregated attentively over the corpus, so the reward
lives in the text side of CLIP's space, where the generator's outputs are.) The generator follows the
policy gradient with the greedy caption's reward as the baseline (the self-critical form of
:func:`clipforge.captioning.scst_loss`).

Simplifications, said here and in docs/captioning.md: the discriminator is a 1-layer GRU over CLIP BPE
tokens (the paper uses a RoBERTa classifier); the corpus embeddings for CLIP-agg are computed once and held
in memory (the paper aggregates the whole corpus the same way); one discriminator update per generator step.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tokenizer import get_tokenizer
from .scst import decode, scst_loss, sequence_logprobs

REWARDS = ("cos", "agg")


def clip_cos_reward(text_features: Tensor, image_features: Tensor) -> Tensor:
    """CLIP-cos: the cosine of each caption with its image [B]."""
    return (F.normalize(text_features.float(), dim=-1) * F.normalize(image_features.float(), dim=-1)).sum(-1)


def aggregated_text(image_features: Tensor, corpus_features: Tensor, temperature: float = 0.01) -> Tensor:
    """t_agg [B, d]: the corpus text embeddings weighted by softmax(cos(image, sentence) / temperature), normalized."""
    if temperature <= 0:
        raise ValueError(f"the CLIP-agg temperature must be > 0, got {temperature}")
    v = F.normalize(image_features.float(), dim=-1)
    s = F.normalize(corpus_features.float(), dim=-1)
    weights = torch.softmax(v @ s.t() / temperature, dim=-1)
    return F.normalize(weights @ s, dim=-1)


def clip_agg_reward(text_features: Tensor, image_features: Tensor, corpus_features: Tensor,
                    temperature: float = 0.01) -> Tensor:
    """CLIP-agg: the cosine of each caption with its image's aggregated corpus embedding [B]."""
    t = F.normalize(text_features.float(), dim=-1)
    return (t * aggregated_text(image_features, corpus_features, temperature)).sum(-1)


class CaptionDiscriminator(nn.Module):
    """D: captions (CLIP BPE ids [B, L], 0 = padding) -> one logit each (real corpus caption or generated)."""

    def __init__(self, vocab_size: int = 49408, width: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width, padding_idx=0)
        self.gru = nn.GRU(width, width, batch_first=True)
        self.out = nn.Linear(width, 1)

    def forward(self, ids: Tensor) -> Tensor:
        lengths = (ids != 0).sum(1).clamp_min(1)
        states, _ = self.gru(self.embed(ids))
        last = states[torch.arange(ids.shape[0]), lengths - 1]  # the state after the last real token
        return self.out(last).squeeze(-1)


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """BCE: corpus captions labelled 1, generated captions 0, averaged over all of them."""
    logits = torch.cat([real_logits, fake_logits]).float()
    labels = torch.cat([torch.ones_like(real_logits), torch.zeros_like(fake_logits)]).float()
    return F.binary_cross_entropy_with_logits(logits, labels)


class CgTGAN:
    """The CgT-GAN rewards and one training step around an SCST ``policy``, a frozen CLIP ``judge`` and a
    discriminator. ``reward``: ``cos`` or ``agg`` (then ``corpus`` sentences are embedded once by the judge);
    ``lam``: the weight of the naturalness reward."""

    def __init__(self, policy, judge, discriminator: CaptionDiscriminator, reward: str = "cos", lam: float = 1.0,
                 corpus: Sequence[str] | None = None, temperature: float = 0.01):
        if reward not in REWARDS:
            raise ValueError(f"CgT-GAN reward must be one of {', '.join(REWARDS)}, got {reward!r}")
        if reward == "agg" and not corpus:
            raise ValueError("the CLIP-agg reward aggregates a text corpus: give corpus=[sentences]")
        self.policy, self.judge, self.discriminator = policy, judge, discriminator
        self.reward_kind, self.lam, self.temperature = reward, lam, temperature
        self.tok = get_tokenizer(judge.context_length)
        self.corpus_features = None
        if reward == "agg":
            with torch.no_grad():
                self.corpus_features = torch.cat([judge.encode_text(self.tok(list(corpus[i:i + 256]))).float()
                                                  for i in range(0, len(corpus), 256)])

    @torch.no_grad()
    def rewards(self, image_features: Tensor, texts: list[str]) -> dict[str, Tensor]:
        """``clip`` (CLIP-cos or CLIP-agg), ``naturalness`` sigma(D(c)) and ``total`` for each caption."""
        t = self.judge.encode_text(self.tok(texts)).float()
        if self.reward_kind == "cos":
            r_clip = clip_cos_reward(t, image_features)
        else:
            r_clip = clip_agg_reward(t, image_features, self.corpus_features, self.temperature)
        r_d = torch.sigmoid(self.discriminator(self.tok(texts)))
        return {"clip": r_clip, "naturalness": r_d, "total": r_clip + self.lam * r_d}

    def step(self, images: Tensor, real_captions: Sequence[str], opt_generator: torch.optim.Optimizer,
             opt_discriminator: torch.optim.Optimizer, max_len: int | None = None,
             generator: torch.Generator | None = None) -> dict[str, float]:
        """One generator update (self-critical policy gradient on the total reward) and one discriminator update
        (real corpus captions vs the sampled ones)."""
        policy = self.policy
        max_len = min(max_len or policy.max_len, policy.max_len)
        ctx = policy.context(images, generator)
        sampled = decode(policy, ctx.detach(), max_len, greedy=False, generator=generator)
        greedy = decode(policy, ctx.detach(), max_len, greedy=True)
        s_texts, g_texts = policy.texts(sampled), policy.texts(greedy)
        with torch.no_grad():
            v = self.judge.encode_image(images).float()
        r_s, r_g = self.rewards(v, s_texts), self.rewards(v, g_texts)
        token_logp, mask = sequence_logprobs(policy, ctx, sampled)
        g_loss = scst_loss(token_logp, mask, r_s["total"], r_g["total"])
        opt_generator.zero_grad(set_to_none=True)
        g_loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
        opt_generator.step()
        d_loss = discriminator_loss(self.discriminator(self.tok(list(real_captions))),
                                    self.discriminator(self.tok(s_texts)))
        opt_discriminator.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_discriminator.step()
        return {"generator_loss": float(g_loss.detach()), "discriminator_loss": float(d_loss.detach()),
                "reward_clip": float(r_s["clip"].mean()), "reward_naturalness": float(r_s["naturalness"].mean()),
                "reward_total": float(r_s["total"].mean())}


__all__ = ["CaptionDiscriminator", "CgTGAN", "REWARDS", "aggregated_text", "clip_agg_reward", "clip_cos_reward",
           "discriminator_loss"]
