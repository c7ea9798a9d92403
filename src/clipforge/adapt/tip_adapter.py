"""Tip-Adapter and Tip-Adapter-F: a key-value cache of few-shot features added to CLIP's
zero-shot logits.

"Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification" (Zhang et al.,
ECCV 2022). The cache keys are the normalized features F [NK, d] of the K-shot support
images, the values their one-hot labels L [NK, C]. A test feature f gets

    A = exp(-beta (1 - f Fᵀ))                    (affinities, the paper's phi)
    logits = f W_cᵀ (zero-shot) + alpha * A L      (the cache model's logits)

- **Tip-Adapter** (training-free): F is fixed; alpha and beta are searched on a validation
  split (:func:`search_alpha_beta`).
- **Tip-Adapter-F** (fine-tuned): F becomes a trainable parameter, initialized from the
  support features, and is trained with cross-entropy on the combined logits (AdamW,
  lr 1e-3, eps 1e-4, cosine schedule, 20 epochs, batch 256 as in the paper); L and the
  zero-shot classifier stay frozen. alpha and beta are searched on validation again after
  training. At initialization Tip-Adapter-F is exactly Tip-Adapter.

- **CapS-Adapter** ("CapS-Adapter: Caption-based MultiModal Adapter in Zero-Shot
  Classification", Wang et al., 2024): the same cache with the text embeddings of captions
  of each class as keys (:func:`caps_adapter_logits`), so no labelled image is needed.

The paper scales zero-shot logits by 100; here they are whatever the caller passes (the
evaluation suite uses the model's own logit scale), and alpha's grid spans that range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics import top1
from .common import FeatureSet, set_seed

ALPHAS = (0.1, 0.3, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0)
BETAS = (0.5, 1.0, 2.0, 3.5, 5.5, 7.0, 10.0, 15.0)


def tip_adapter_logits(
    features: Tensor, keys: Tensor, key_labels: Tensor, num_classes: int, beta: float = 5.5
) -> Tensor:
    """Cache read-out A L with A = exp(-beta (1 - x·k)); add ``alpha`` times this to the zero-shot logits."""
    affinity = torch.exp(-beta * (1 - features @ keys.t()))
    values = F.one_hot(key_labels.long(), num_classes).to(features.dtype)
    return affinity @ values


def caps_adapter_logits(features: Tensor, caption_features: Tensor, caption_labels: Tensor, num_classes: int,
                        beta: float = 5.5) -> Tensor:
    """CapS-Adapter: a Tip-Adapter cache whose keys are caption (text) embeddings of each class."""
    return tip_adapter_logits(features, F.normalize(caption_features, dim=-1), caption_labels, num_classes, beta)


def caption_support(captions: Sequence[Sequence[str]], labels: Tensor,
                    index: Sequence[int]) -> tuple[list[str], Tensor]:
    """CapS-Adapter's support set: every caption of the images ``index`` picks, with its image's label.

    ``captions[i]`` are image i's captions and ``labels[i]`` its class; the result is the flat caption
    list and a label tensor of the same length (the cache keys are these captions' text embeddings).
    Both the evaluation suite's ``few_shot`` task and ``clipforge adapt --method caps`` build it here."""
    if len(captions) != len(labels):
        raise ValueError(f"{len(captions)} caption lists for {len(labels)} labels: one list per image is needed")
    pairs = [(c, int(labels[i])) for i in index for c in captions[i]]
    if not pairs:
        raise ValueError("the chosen support images have no captions; CapS-Adapter needs captions as cache keys")
    return [c for c, _ in pairs], torch.tensor([y for _, y in pairs], dtype=torch.long)


def fit_caps_adapter(caption_features: Tensor, caption_labels: Tensor, num_classes: int, val: FeatureSet,
                     search: TipSearch | None = None) -> TipAdapterF:
    """Training-free CapS-Adapter: the cache of normalized caption embeddings (frozen keys) with
    alpha and beta searched on ``val``, exactly as :func:`fit_tip_adapter` does for image keys."""
    return fit_tip_adapter(F.normalize(caption_features.float(), dim=-1), caption_labels, num_classes, val, search)


@dataclass
class TipSearch:
    """The validation grid for alpha (cache weight) and beta (affinity sharpness)."""

    alphas: tuple[float, ...] = ALPHAS
    betas: tuple[float, ...] = BETAS


def search_alpha_beta(cache_logits: Callable[[float], Tensor], val: FeatureSet,
                      search: TipSearch | None = None) -> tuple[float, float, float]:
    """(alpha, beta, validation top-1) maximizing the validation accuracy of
    ``val.zero_shot_logits + alpha * cache_logits(beta)``. Ties keep the smaller alpha (the
    answer closest to zero-shot), then the smaller beta."""
    search = search or TipSearch()
    best = (-1.0, 0.0, 0.0)
    for beta in search.betas:
        with torch.no_grad():
            cache = cache_logits(beta)
        for alpha in sorted(search.alphas):
            acc = top1(val.zero_shot_logits + alpha * cache, val.labels)
            if acc > best[0] or (acc == best[0] and (alpha, beta) < (best[1], best[2])):
                best = (acc, alpha, beta)
    return best[1], best[2], best[0]


class TipAdapterF(nn.Module):
    """The cache model with trainable keys; ``forward(f, zs) = zs + alpha * exp(-beta (1 - f Kᵀ)) L``.

    ``keys`` [N, d] start as the support features (Tip-Adapter-F's initialization); the values
    L (one-hot labels) are a buffer and never train."""

    def __init__(self, keys: Tensor, key_labels: Tensor, num_classes: int, alpha: float = 1.0, beta: float = 1.0):
        super().__init__()
        if keys.shape[0] != key_labels.shape[0]:
            raise ValueError(f"{keys.shape[0]} keys but {key_labels.shape[0]} labels")
        self.keys = nn.Parameter(keys.detach().clone().float())
        self.register_buffer("values", F.one_hot(key_labels.long(), num_classes).float())
        self.alpha, self.beta = float(alpha), float(beta)

    @property
    def num_classes(self) -> int:
        return self.values.shape[1]

    def cache_logits(self, features: Tensor, beta: float | None = None) -> Tensor:
        beta = self.beta if beta is None else beta
        return torch.exp(-beta * (1 - features @ self.keys.t())) @ self.values

    def forward(self, features: Tensor, zero_shot_logits: Tensor) -> Tensor:
        return zero_shot_logits + self.alpha * self.cache_logits(features)

    def search(self, val: FeatureSet, search: TipSearch | None = None) -> float:
        """Set alpha and beta to the best pair on ``val``; returns its validation top-1."""
        self.alpha, self.beta, acc = search_alpha_beta(lambda b: self.cache_logits(val.features, b), val, search)
        return acc


def fit_tip_adapter(keys: Tensor, key_labels: Tensor, num_classes: int, val: FeatureSet,
                    search: TipSearch | None = None) -> TipAdapterF:
    """Training-free Tip-Adapter: the cache of ``keys`` (frozen) with alpha and beta searched on ``val``."""
    adapter = TipAdapterF(keys, key_labels, num_classes).requires_grad_(False)
    adapter.search(val, search)
    return adapter


@dataclass
class TipAdapterFConfig:
    """Tip-Adapter-F's fine-tuning. ``init_alpha``/``init_beta`` None: start from the values the
    training-free search picks on validation (the paper uses per-dataset constants near 1)."""

    epochs: int = 20
    lr: float = 1e-3
    eps: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 256
    seed: int = 0
    init_alpha: float | None = None
    init_beta: float | None = None
    search: TipSearch = field(default_factory=TipSearch)


def fit_tip_adapter_f(keys: Tensor, key_labels: Tensor, num_classes: int, train: FeatureSet, val: FeatureSet,
                      cfg: TipAdapterFConfig | None = None) -> tuple[TipAdapterF, dict]:
    """Tip-Adapter-F: train the cache keys with cross-entropy on ``train`` (the support images,
    or augmented views of them), then search alpha and beta on ``val``. Returns the adapter and
    a history (initial alpha/beta, per-epoch training loss, final alpha/beta and val top-1)."""
    cfg = cfg or TipAdapterFConfig()
    adapter = TipAdapterF(keys, key_labels, num_classes)
    if cfg.init_alpha is None or cfg.init_beta is None:
        alpha, beta, _ = search_alpha_beta(lambda b: adapter.cache_logits(val.features, b), val, cfg.search)
        adapter.alpha = alpha if cfg.init_alpha is None else cfg.init_alpha
        adapter.beta = beta if cfg.init_beta is None else cfg.init_beta
    else:
        adapter.alpha, adapter.beta = cfg.init_alpha, cfg.init_beta
    history: dict = {"init_alpha": adapter.alpha, "init_beta": adapter.beta, "loss": []}
    gen = set_seed(cfg.seed)
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.epochs * steps_per_epoch))
    feats, zs, y = train.features.detach().float(), train.zero_shot_logits.detach().float(), train.labels.long()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(train), generator=gen)
        total = 0.0
        for i in range(0, len(train), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(adapter(feats[idx], zs[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        history["loss"].append(total / len(train))
    adapter.requires_grad_(False)
    history["val_top1"] = adapter.search(val, cfg.search)
    history["alpha"], history["beta"] = adapter.alpha, adapter.beta
    return adapter, history
