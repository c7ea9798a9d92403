"""uCLIP-style alignment of a frozen multilingual sentence encoder to a frozen CLIP, English as the pivot.

Chung et al., 2025, "uCLIP: Parameter-Efficient Multilingual Extension of Vision-Language
Models with Unpaired Data". Both encoders stay frozen; only the projection P of
:class:`clipforge.models.pivot.PivotProjection` trains, on English text alone (no image-text
pairs, no translations). With M the multilingual encoder, T CLIP's text tower and V its
image tower (all outputs L2-normalized), for a batch of English texts x_1..x_B:

    z_i = normalize(P(M(x_i) + sigma * eps_i)),   t_i = T(x_i),   eps_i ~ N(0, I)

    L_pivot = 1/2 [ CE_i(z_i . t_j / tau) + CE_j(t_j . z_i / tau) ]         (symmetric InfoNCE)

The Gaussian perturbation sigma (``noise_std``) stands in for the gap between languages in
M's space, so P learns a map that is robust to where a translation lands (uCLIP perturbs
embeddings in training for the same reason).

Optional image term (``image_weight`` > 0), from unpaired images: CLIP's image embedding v_k
retrieves a soft pseudo-caption from the batch's English texts, and its multilingual
counterpart must pick v_k among the batch's images,

    w_kj = softmax_j(v_k . t_j / tau_m),   zhat_k = normalize(sum_j w_kj z_j),
    L_image = 1/2 [ CE_k(v_k . zhat_l / tau) + CE_k(zhat_k . v_l / tau) ]

which is our reading of uCLIP's memory-based soft retrieval (the paper's exact memory and
its intra-alignment terms are not reproduced here). Everything frozen is encoded once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..losses.clip import clip_loss
from ..models.pivot import PivotCLIP, PivotProjection
from .optim import cosine_with_warmup


@dataclass
class PivotConfig:
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    hidden: int = 1024  # width of P's hidden layer; 0 = a linear map
    temperature: float = 0.05  # tau of both InfoNCE terms (fixed)
    noise_std: float = 0.0  # sigma: Gaussian perturbation of the encoder features in training
    image_weight: float = 0.0  # weight of the unpaired-image soft-retrieval term
    retrieval_temperature: float = 0.05  # tau_m of the soft retrieval
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"pivot {name} must be >= 1, got {getattr(self, name)}")
        for name in ("temperature", "retrieval_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"pivot {name} must be > 0, got {getattr(self, name)}")
        if self.noise_std < 0 or self.image_weight < 0:
            raise ValueError("pivot noise_std and image_weight must be >= 0")


@torch.no_grad()
def clip_text_targets(clip, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256) -> Tensor:
    """T(x): CLIP's normalized text embeddings of ``texts``, in eval mode."""
    was = clip.training
    clip.eval()
    out = [
        clip.encode_text(tokenizer(list(texts[i : i + batch_size]))).float() for i in range(0, len(texts), batch_size)
    ]
    clip.train(was)
    return torch.cat(out)


def pivot_losses(z: Tensor, t: Tensor, cfg: PivotConfig, v: Tensor | None = None) -> dict[str, Tensor]:
    """The two terms of the module docstring on normalized features z, t [B, d] and images v [K, d]."""
    out = {"pivot": clip_loss(z, t, 1.0 / cfg.temperature)}
    loss = out["pivot"]
    if v is not None and cfg.image_weight > 0:
        w = torch.softmax(v @ t.t() / cfg.retrieval_temperature, dim=1)
        zhat = F.normalize(w @ z, dim=-1)
        out["image"] = clip_loss(v, zhat, 1.0 / cfg.temperature)
        loss = loss + cfg.image_weight * out["image"]
    out["loss"] = loss
    return out


def train_pivot(clip, tokenizer: Callable, encoder, texts: Sequence[str], cfg: PivotConfig | None = None,
                image_features: Tensor | None = None, progress: bool = True) -> tuple[PivotCLIP, list[dict]]:
    """Train P on English ``texts`` (deduplicated); returns the :class:`PivotCLIP` and the loss log.

    ``image_features``: CLIP image embeddings [K, d] of unpaired images for the image term
    (needed when ``cfg.image_weight > 0``). ``clip`` and ``encoder`` are not changed.
    """
    cfg = cfg if cfg is not None else PivotConfig()
    texts = list(dict.fromkeys(str(t) for t in texts))
    if len(texts) < 2:
        raise ValueError(f"pivot alignment needs at least 2 distinct English texts, got {len(texts)}")
    if cfg.image_weight > 0 and (image_features is None or len(image_features) < 2):
        raise ValueError("pivot image_weight > 0 needs image_features: CLIP image embeddings of unpaired images")
    targets = clip_text_targets(clip, tokenizer, texts)
    sources = encoder(texts).float()
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        projection = PivotProjection(sources.shape[1], targets.shape[1], cfg.hidden)
    opt = torch.optim.AdamW(projection.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, cfg.warmup_steps, cfg.steps))
    batch = min(cfg.batch_size, len(texts))
    log = []
    for step in tqdm(range(cfg.steps), desc="pivot alignment", disable=not progress):
        idx = torch.randperm(len(texts), generator=gen)[:batch]
        x = sources[idx]
        if cfg.noise_std > 0:
            x = x + cfg.noise_std * torch.randn(x.shape, generator=gen)
        z = F.normalize(projection(x), dim=-1)
        v = None
        if cfg.image_weight > 0:
            v = image_features[torch.randperm(len(image_features), generator=gen)[:batch]].float()
        out = pivot_losses(z, targets[idx], cfg, v)
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(f"pivot alignment: the loss became {out['loss'].item()} at step {step}; "
                                     "lower the learning rate")
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            log.append({"step": step, **{k: round(float(v.detach()), 5) for k, v in out.items()}})
    projection.eval()
    return PivotCLIP(clip, encoder, projection), log

