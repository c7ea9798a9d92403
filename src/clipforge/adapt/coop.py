"""CoOp: context optimization, learned prompt vectors for a frozen CLIP.

"Learning to Prompt for Vision-Language Models" (Zhou et al., IJCV 2022). The hand-written
template words before the class name are replaced by M learnable context vectors in the
text tower's token-embedding space. The prompt of class i is (the paper's Eq. (2), class
token at the end)

    t_i = [SOS] [V]_1 [V]_2 ... [V]_M [CLASS_i] . [EOS]

and the prediction (the paper's Eq. (3)) is

    p(y = i | x) = exp(<g(t_i), f>/tau) / sum_j exp(<g(t_j), f>/tau),

with g the text tower, f the image feature and 1/tau the model's logit scale. The context
is shared by all classes (unified) or one per class (``class_specific``, CoOp's CSC); it
starts from N(0, 0.02^2) or from the embeddings of an initialization phrase such as
"a picture of a". Only the context trains (cross-entropy on the few-shot images, SGD with a
cosine schedule and a constant-lr warmup epoch, as the paper); the image and text towers are
frozen, so the image features can be computed once.

The text tower reads the prompt through ``CLIP.encode_text(ids, embeddings=...)``: the
token embeddings replace the lookup, ``ids`` (the prompt with placeholder words) still mark
the end-of-text token.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import set_seed


@dataclass
class CoOpConfig:
    """CoOp's options. ``ctx_init`` set: M is its token count and the context starts at its
    embeddings; None: ``n_ctx`` vectors from N(0, ``init_std``^2) (the paper's default, M=16
    on ImageNet). Optimization defaults follow the paper (SGD, lr 0.002, momentum 0.9,
    batch 32, cosine, one warmup epoch at lr 1e-5) except the epoch count (200 in the paper
    for 16 shots)."""

    n_ctx: int = 4
    ctx_init: str | None = "a picture of a"
    class_specific: bool = False
    init_std: float = 0.02
    epochs: int = 100
    batch_size: int = 32
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    seed: int = 0


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode with no parameter requiring a gradient; both restored on exit."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


class PromptLearner(nn.Module):
    """Learnable context vectors and the frozen rest of each class's prompt.

    ``ctx`` [M, width] (or [C, M, width] class-specific) is the only parameter; the start token
    and the "CLASS . [EOS] padding" suffix are buffers, embedded once. The CLIP model is held
    as a plain attribute, not a submodule, so its weights are not the learner's parameters."""

    def __init__(self, model, tokenizer: Callable, classnames: Sequence[str], cfg: CoOpConfig | None = None):
        super().__init__()
        cfg = cfg or CoOpConfig()
        text = getattr(model, "text", None)
        if not hasattr(text, "token_embedding"):
            raise ValueError("CoOp needs clipforge's own text transformer (token embeddings it can replace), "
                             f"not a {type(text).__name__}")
        self.cfg = cfg
        self.classnames = list(classnames)
        object.__setattr__(self, "model", model)
        if cfg.ctx_init:
            init_ids = tokenizer([cfg.ctx_init])
            n_ctx = int(text.eot_index(init_ids)[0]) - 1  # tokens between the start and end tokens
            if n_ctx < 1:
                raise ValueError(f"ctx_init {cfg.ctx_init!r} has no tokens")
            prefix = cfg.ctx_init
        else:
            n_ctx = cfg.n_ctx
            if n_ctx < 1:
                raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
            prefix = " ".join(["X"] * n_ctx)
        self.n_ctx = n_ctx
        ids = tokenizer([f"{prefix} {name}." for name in self.classnames])
        if ids.shape[1] > model.context_length:
            raise ValueError(f"the tokenizer gives {ids.shape[1]} tokens; the model reads {model.context_length}")
        eot = text.eot_index(ids)
        has_eot = (ids == text.cfg.eot_token_id).any(dim=1)
        if not bool(has_eot.all()) or bool((eot <= n_ctx + 1).any()):
            raise ValueError(f"a prompt '{prefix} CLASS.' does not fit the context length {ids.shape[1]}")
        with torch.no_grad():
            emb = text.token_embedding(ids).float()
        self.register_buffer("ids", ids)
        self.register_buffer("prefix", emb[:, :1].clone())  # [SOS]
        self.register_buffer("suffix", emb[:, 1 + n_ctx :].clone())  # CLASS . [EOS] padding
        gen = set_seed(cfg.seed)
        if cfg.ctx_init:
            ctx = emb[0, 1 : 1 + n_ctx].clone()
        else:
            ctx = torch.randn(n_ctx, emb.shape[-1], generator=gen) * cfg.init_std
        if cfg.class_specific:
            ctx = ctx.unsqueeze(0).repeat(len(self.classnames), 1, 1)
        self.ctx = nn.Parameter(ctx)

    def embeddings(self) -> Tensor:
        """The prompts' token embeddings [C, L, width]: start token, context, the rest."""
        ctx = self.ctx if self.ctx.ndim == 3 else self.ctx.unsqueeze(0).expand(len(self.classnames), -1, -1)
        return torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)

    def text_features(self) -> Tensor:
        """Normalized class embeddings g(t_i) [C, d]."""
        return self.model.encode_text(self.ids, embeddings=self.embeddings())

    def forward(self, image_features: Tensor) -> Tensor:
        """Logits scale * f g(t)ᵀ for normalized image features [N, d]."""
        return self.model.scale().detach() * image_features @ self.text_features().t()

    @torch.no_grad()
    def classifier(self) -> Tensor:
        """The learned zero-shot classifier [C, d], detached."""
        with frozen(self.model):
            return self.text_features().float()


def zero_last_mlp(d: int, hidden: int, out: int) -> nn.Sequential:
    """A two-layer MLP d -> hidden -> out (ReLU) whose last layer starts at zero, so a learner that adds its
    output (a prompt shift, a residual projection) starts as plain CoOp."""
    net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, out))
    nn.init.zeros_(net[2].weight)
    nn.init.zeros_(net[2].bias)
    return net


def check_conditional_options(prompt: CoOpConfig, meta_ratio: int, chunk: int, shared_context_reason: str) -> None:
    """The options every image-conditioned prompt learner (TMM, GOPro) checks: a shared CoOp context (the
    image supplies the per-class or per-image part; ``shared_context_reason`` says why), a positive hidden-width
    ratio of its meta-net and a positive inference chunk."""
    if prompt.class_specific:
        raise ValueError(f"{shared_context_reason}; set class_specific=False")
    if meta_ratio < 1 or chunk < 1:
        raise ValueError(f"meta_ratio and chunk must be positive, got {meta_ratio} and {chunk}")


class ConditionalPromptLearner(PromptLearner):
    """CoOp's shared context made image-dependent: one prompt per image and class (CoCoOp-style), the base
    of TMM and GOPro. A subclass builds the per-image context [B, C, M, width]; this class puts the start
    token and each class's suffix around it (:meth:`assemble`), runs the B x C prompts through the text tower
    (:meth:`encode_prompts`) and predicts in chunks of ``chunk`` images with the model frozen (:meth:`logits`,
    which calls ``self(features)``)."""

    def __init__(self, model, tokenizer: Callable, classnames: Sequence[str], prompt: CoOpConfig, chunk: int):
        super().__init__(model, tokenizer, classnames, prompt)
        self.chunk = chunk

    def assemble(self, ctx: Tensor) -> Tensor:
        """Token embeddings [B, C, L, width] of the prompts with per-image, per-class context ``ctx``
        [B, C, M, width]: [SOS] ctx CLASS . [EOS]."""
        b = ctx.shape[0]
        prefix = self.prefix.unsqueeze(0).expand(b, -1, -1, -1)
        suffix = self.suffix.unsqueeze(0).expand(b, -1, -1, -1)
        return torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=2)

    def encode_prompts(self, emb: Tensor, normalize: bool = False) -> Tensor:
        """Text-tower features [B, C, d] (float; unit length when ``normalize``) of the prompt embeddings
        [B, C, L, width]."""
        b, c = emb.shape[:2]
        ids = self.ids.unsqueeze(0).expand(b, -1, -1).reshape(b * c, -1)
        out = self.model.encode_text(ids, embeddings=emb.reshape(b * c, *emb.shape[2:])).float()
        return (F.normalize(out, dim=-1) if normalize else out).view(b, c, -1)

    @torch.no_grad()
    def logits(self, image_features: Tensor) -> Tensor:
        """``self(features)`` in chunks of ``chunk`` images, model frozen."""
        with frozen(self.model):
            n = self.chunk
            parts = [self(image_features[i : i + n]) for i in range(0, len(image_features), n)]
        return torch.cat(parts) if parts else image_features.new_zeros(0, len(self.classnames))


def _lr_at(step: int, steps_per_epoch: int, total: int, cfg: CoOpConfig) -> float:
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.warmup_lr
    t = (step - warm) / max(1, total - warm)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))


def train_prompts(learner: PromptLearner, features: Tensor, labels: Tensor,
                  loss_fn: Callable[[PromptLearner, Tensor, Tensor], Tensor], cfg: CoOpConfig) -> dict:
    """The prompt-learning loop: ``loss_fn(learner, features, labels)`` minimized over the
    learner's own parameters (for CoOp the context alone; TMM and GOPro add small networks),
    with SGD with momentum, a warmup epoch at constant ``warmup_lr``, then cosine from ``lr``
    to 0, and the CLIP model frozen (it is not a submodule of the learner). ``features`` may
    carry extra leading-dimension data per example (GOPro's augmented views [N, V, d]).
    Returns the per-epoch mean loss."""
    gen = set_seed(cfg.seed)
    params = [p for p in learner.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    feats, y = features.detach().float(), labels.long()
    n = len(y)
    if n == 0:
        raise ValueError("prompt learning needs at least one labelled image feature")
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = (cfg.warmup_epochs + cfg.epochs) * steps_per_epoch
    history: dict = {"loss": [], "n_ctx": learner.n_ctx}
    step = 0
    with frozen(learner.model):
        for _ in range(cfg.warmup_epochs + cfg.epochs):
            order = torch.randperm(n, generator=gen)
            loss_sum = 0.0
            for i in range(0, n, cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, steps_per_epoch, total, cfg)
                loss = loss_fn(learner, feats[idx], y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += loss.item() * len(idx)
            history["loss"].append(loss_sum / n)
    return history


def coop_loss(learner: PromptLearner, features: Tensor, labels: Tensor) -> Tensor:
    """CoOp's objective: cross-entropy of the prompt classifier's logits."""
    return F.cross_entropy(learner(features), labels)


def fit_coop(model, tokenizer: Callable, classnames: Sequence[str], features: Tensor, labels: Tensor,
             cfg: CoOpConfig | None = None) -> tuple[PromptLearner, dict]:
    """Learn CoOp context vectors on normalized image ``features`` [N, d] with ``labels``.

    The model is frozen for the duration (its parameters and mode are restored afterwards);
    returns the prompt learner and the per-epoch training loss plus the final training top-1."""
    cfg = cfg or CoOpConfig()
    learner = PromptLearner(model, tokenizer, classnames, cfg)
    history = train_prompts(learner, features, labels, coop_loss, cfg)
    with torch.no_grad(), frozen(model):
        history["train_top1"] = float((learner(features.float()).argmax(1) == labels).float().mean())
    return learner, history
