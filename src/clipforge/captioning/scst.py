"""Self-critical sequence training (SCST) with a CLIP-S reward: Rennie et al., 2017, "Self-critical Sequence
Training for Image Captioning", with the reward of Cho et al., 2022, "Fine-grained Image Captioning with CLIP
Reward" (the CLIP similarity of image and caption instead of CIDEr; no reference captions needed).

For an image I, sample a caption w^s ~ p_theta(. | I) and decode the greedy caption w^g; with the reward
r(w) = CLIP-S(w, I) = 2.5 * max(cos(CLIP_text(w), CLIP_image(I)), 0) under a frozen judge CLIP::

    L(theta) = -(r(w^s) - r(w^g)) * sum_t log p_theta(w^s_t | I, w^s_<t)

(Rennie et al. Eq. 9: the REINFORCE gradient with the greedy caption's reward as the baseline), averaged
over the batch; the sampled end token counts, the padding after it does not. Sampling and the log-probs
use the same distribution as decoding: start and padding tokens are never emitted before the end token.

Policies: :class:`CoCaPolicy` (CoCa's attentional pooler and multimodal decoder train; the towers stay
frozen, since the decoder reads the text tower's states and the contrastive embeddings must not drift) and
:class:`MacCapPolicy` (the MacCap decoder trains on images, with MacCap's inference features). Cho et al.'s
grammar fine-tuning of the text encoder against degenerate captions is :mod:`clipforge.captioning.grammar`; its
reward (CLIP-S plus the grammar score) goes in through ``scst_step(..., reward=...)``.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..models import CoCa
from ..tokenizer import get_tokenizer
from .maccap import EOT, PAD, SOT, MacCapCaptioner, noise_injection, region_features
from .metrics import clip_s


class CoCaPolicy:
    """CoCa's captioning half as an SCST policy over CLIP BPE ids; freezes the rest of the model
    (``requires_grad`` only for :meth:`trainable_parameters`)."""

    def __init__(self, model: CoCa):
        if not isinstance(model, CoCa):
            raise ValueError(f"CoCaPolicy needs a CoCa model, got {type(model).__name__} (it has no decoder)")
        self.model = model
        self.sot, self.eot, self.pad = 49406, model.cfg.text.eot_token_id, model.cfg.text.pad_token_id
        self.tokenizer = get_tokenizer(model.context_length)
        self.max_len = model.context_length
        freeze_all_but(model, self.trainable_parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        m = self.model
        return [*m.attn_pool_caption.parameters(), *m.ln_caption.parameters(), *m.decoder.parameters()]

    def context(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            tokens = self.model.visual.forward_tokens(images)
        return self.model.ln_caption(self.model.attn_pool_caption(tokens))

    def logits(self, ctx: Tensor, ids: Tensor) -> Tensor:
        return self.model.caption_logits(ctx, ids)

    def texts(self, ids: Tensor) -> list[str]:
        return [self.tokenizer.decode(row.tolist()) for row in ids]


class MacCapPolicy:
    """A MacCap decoder as an SCST policy: image sub-region features + inference noise -> prefix -> decoder."""

    def __init__(self, captioner: MacCapCaptioner):
        self.cap = captioner
        self.sot, self.eot, self.pad = SOT, EOT, PAD
        self.max_len = captioner.cfg.max_len

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.cap.decoder.parameters())

    def context(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        c = self.cap.cfg
        with torch.no_grad():
            _, feats = region_features(self.cap.clip, images, c.n_features, c.patch_weight, c.region_weights)
        return self.cap.decoder.prefix(noise_injection(feats, c.infer_noise_variance, generator))

    def logits(self, ctx: Tensor, ids: Tensor) -> Tensor:
        return self.cap.decoder.logits(ctx, ids)

    def texts(self, ids: Tensor) -> list[str]:
        return self.cap.decode(ids)


def _masked(policy, logits: Tensor) -> Tensor:
    logits = logits.float().clone()
    logits[..., [policy.sot, policy.pad]] = -torch.inf
    return logits


@torch.no_grad()
def decode(policy, ctx: Tensor, max_len: int, greedy: bool, generator: torch.Generator | None = None) -> Tensor:
    """Ids [B, <= max_len]: start token, then sampled (or argmax) tokens up to the end token, then padding."""
    b = ctx.shape[0]
    ids = torch.full((b, 1), policy.sot, dtype=torch.long, device=ctx.device)
    done = torch.zeros(b, dtype=torch.bool, device=ctx.device)
    for _ in range(max_len - 1):
        logits = _masked(policy, policy.logits(ctx, ids)[:, -1])
        if greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, policy.pad), nxt)
        ids = torch.cat([ids, nxt.unsqueeze(1)], dim=1)
        done = done | (nxt == policy.eot)
        if done.all():
            break
    return ids


def sequence_logprobs(policy, ctx: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(log p(ids_t | ctx, ids_<t) for t >= 1 [B, T-1], mask of the tokens that count [B, T-1])."""
    logp = _masked(policy, policy.logits(ctx, ids[:, :-1])).log_softmax(-1)
    target = ids[:, 1:]
    mask = target != policy.pad
    token = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, token, torch.zeros_like(token)), mask


def scst_loss(token_logprobs: Tensor, mask: Tensor, sample_reward: Tensor, baseline_reward: Tensor) -> Tensor:
    """``-mean_b (r_s - r_g) * sum_t mask * log p`` (module docstring); rewards carry no gradient."""
    advantage = (sample_reward - baseline_reward).detach().to(token_logprobs.dtype)
    return -(advantage * (token_logprobs * mask).sum(1)).mean()


@torch.no_grad()
def clip_s_reward(judge, images: Tensor, texts: list[str]) -> Tensor:
    tok = get_tokenizer(judge.context_length)
    return clip_s(judge.encode_text(tok(texts)).float(), judge.encode_image(images).float())


def frozen_judge(model) -> Any:
    """A frozen copy of a CLIP to compute rewards with (the policy may share towers with it)."""
    judge = copy.deepcopy(model).eval()
    for p in judge.parameters():
        p.requires_grad_(False)
    return judge


def scst_step(policy, judge, images: Tensor, optimizer: torch.optim.Optimizer, max_len: int | None = None,
              generator: torch.Generator | None = None,
              reward: Callable[[Tensor, list[str]], Tensor] | None = None) -> dict[str, float]:
    """One SCST update on a batch of preprocessed images; returns the loss and the mean rewards.

    ``reward(images, texts) -> [B]``: default CLIP-S under ``judge``; e.g.
    :func:`clipforge.captioning.grammar.clip_s_grammar_reward` adds the grammar score."""
    reward = reward or (lambda ims, texts: clip_s_reward(judge, ims, texts))
    max_len = min(max_len or policy.max_len, policy.max_len)
    ctx = policy.context(images, generator)
    sampled = decode(policy, ctx.detach(), max_len, greedy=False, generator=generator)
    greedy = decode(policy, ctx.detach(), max_len, greedy=True)
    r_s = reward(images, policy.texts(sampled))
    r_g = reward(images, policy.texts(greedy))
    token_logp, mask = sequence_logprobs(policy, ctx, sampled)
    loss = scst_loss(token_logp, mask, r_s, r_g)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
    optimizer.step()
    return {"loss": float(loss.detach()), "reward_sample": float(r_s.mean()), "reward_greedy": float(r_g.mean())}


def freeze_all_but(model: nn.Module, params: list[nn.Parameter]) -> None:
    """requires_grad only for ``params`` (the policy's trainable parameters)."""
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


__all__ = ["CoCaPolicy", "MacCapPolicy", "clip_s_reward", "decode", "freeze_all_but", "frozen_judge", "scst_loss",
           "scst_step", "sequence_logprobs"]
