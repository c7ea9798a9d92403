"""GOPro: generated and optimized prompts with image/text projectors and self-supervised view losses.

"GOPro: Generate and Optimize Prompts in CLIP using Self-Supervised Learning" (Singha et al.,
BMVC 2023). CLIP stays frozen; on top of it GOPro learns prompts that are generated from the
image, plus a pair of projectors, with three losses over two augmented views x1, x2 of each image:

- **prompts**: class c's prompt for image x is

      t_c(x) = [SOS] [V_1 + pi(x)] ... [V_M + pi(x)] [CLASS_c] . [EOS],   pi(x) = h(f(x)),

  V the shared CoOp context, f(x) the frozen normalized image feature, h a two-layer meta-net
  (d -> d/r -> width) whose last layer starts at zero;
- **projectors**: P_v(z) = normalize(z + m_v(z)) on image features, P_t(z) = normalize(z + m_t(z))
  on text features, m_* two-layer MLPs with a zero-initialized last layer (GOPro starts as CoOp);
- **CLIP loss** (cross-domain contrast with the class prompts), for each view v in {1, 2}:

      L_clip = 1/2 sum_v CE(s <P_v(f(x_v)), P_t(g(t_c(x_v)))>_c, y);

- **view-contrastive loss** (the visual SSL term, NT-Xent over the batch, temperature tau):

      L_view = 1/2 [CE(<P_v(f(x1_i)), P_v(f(x2_j))>_j / tau, i) + CE(<P_v(f(x2_i)), P_v(f(x1_j))>_j / tau, i)];

- **prompt-consistency loss**: the text features of the prompts generated from the two views agree,

      L_pc = mean_{i,c} || P_t(g(t_c(x1_i))) - P_t(g(t_c(x2_i))) ||^2;

- **total**: L = L_clip + lambda_view L_view + lambda_pc L_pc; prediction on the un-augmented image:
  softmax_c(s <P_v(f(x)), P_t(g(t_c(x)))>).

Simplifications, stated here and in docs/adaptation.md: GOPro generates its prompt tokens from
"content and style primitives" of the image tower (intermediate feature statistics); here the
conditioning is the global image feature alone (CoCoOp-style meta-net), because the tower is
frozen and its features are computed once per view. The augmented views are drawn once
(:func:`encode_views`, random resized crops and color jitter, no flips: shapes' captions state
left/right) and each training step picks two distinct views per batch. The optimizer is CoOp's
(:func:`clipforge.adapt.coop.train_prompts`) over all of GOPro's parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..transforms import image_transform
from .coop import ConditionalPromptLearner, CoOpConfig, check_conditional_options, frozen, train_prompts, zero_last_mlp


@dataclass
class GOProConfig:
    """GOPro's options: ``prompt`` the CoOp part (shared context only), loss weights, the
    NT-Xent temperature, ``meta_ratio`` r (hidden width d/r of the meta-net and projectors),
    and how the support images' augmented views are drawn (``views`` per image, crop ``scale``,
    color ``jitter``)."""

    prompt: CoOpConfig = field(default_factory=CoOpConfig)
    view_weight: float = 1.0
    consistency_weight: float = 1.0
    temperature: float = 0.1
    meta_ratio: int = 4
    views: int = 4
    crop_scale: tuple[float, float] = (0.5, 1.0)
    jitter: float = 0.3
    chunk: int = 64

    def __post_init__(self):
        check_conditional_options(self.prompt, self.meta_ratio, self.chunk,
                                  "GOPro generates its prompts from the image with a shared context")
        if self.views < 2:
            raise ValueError(f"GOPro needs at least 2 augmented views per image, got views={self.views}")
        if self.temperature <= 0 or self.view_weight < 0 or self.consistency_weight < 0:
            raise ValueError("temperature must be positive and the loss weights non-negative, got "
                             f"{self.temperature}, {self.view_weight}, {self.consistency_weight}")


class GOProLearner(ConditionalPromptLearner):
    """CoOp's shared context, the prompt meta-net h and the projectors m_v, m_t (trainable)."""

    def __init__(self, model, tokenizer: Callable, classnames: Sequence[str], cfg: GOProConfig | None = None):
        cfg = cfg or GOProConfig()
        super().__init__(model, tokenizer, classnames, cfg.prompt, cfg.chunk)
        self.gopro = cfg
        d, width = int(model.cfg.embed_dim), self.ctx.shape[-1]
        hidden = max(1, d // cfg.meta_ratio)
        self.meta = zero_last_mlp(d, hidden, width)
        self.image_proj = zero_last_mlp(d, hidden, d)
        self.text_proj = zero_last_mlp(d, hidden, d)

    def project_image(self, z: Tensor) -> Tensor:
        return F.normalize(z + self.image_proj(z), dim=-1)

    def project_text(self, z: Tensor) -> Tensor:
        return F.normalize(z + self.text_proj(z), dim=-1)

    def conditioned_embeddings(self, image_features: Tensor) -> Tensor:
        """Token embeddings of t_c(x): [B, C, L, width]."""
        ctx = self.ctx.unsqueeze(0) + self.meta(image_features).unsqueeze(1)  # [B, M, width], one for every class
        return self.assemble(ctx.unsqueeze(1).expand(-1, len(self.classnames), -1, -1))

    def prompt_features(self, image_features: Tensor) -> Tensor:
        """P_t(g(t_c(x))) [B, C, d] for normalized image features [B, d]."""
        return self.project_text(self.encode_prompts(self.conditioned_embeddings(image_features)))

    def view_outputs(self, image_features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits [B, C], projected image features [B, d], prompt features [B, C, d]) of one view."""
        f = image_features.float()
        t = self.prompt_features(f)
        v = self.project_image(f)
        return self.model.scale().detach() * torch.einsum("bd,bcd->bc", v, t), v, t

    def forward(self, image_features: Tensor) -> Tensor:
        """Logits [B, C] of one view (inference: :meth:`logits`, on un-augmented features, in chunks)."""
        return self.view_outputs(image_features)[0]


def gopro_losses(learner: GOProLearner, views: Tensor, labels: Tensor, pair: tuple[int, int]) -> dict[str, Tensor]:
    """GOPro's three terms and the weighted total for views ``pair`` of ``views`` [B, V, d]."""
    cfg = learner.gopro
    logits1, v1, t1 = learner.view_outputs(views[:, pair[0]])
    logits2, v2, t2 = learner.view_outputs(views[:, pair[1]])
    clip = 0.5 * (F.cross_entropy(logits1, labels) + F.cross_entropy(logits2, labels))
    sim = v1 @ v2.t() / cfg.temperature
    target = torch.arange(len(labels), device=sim.device)
    view = 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target))
    consistency = (t1 - t2).pow(2).sum(-1).mean()
    total = clip + cfg.view_weight * view + cfg.consistency_weight * consistency
    return {"total": total, "clip": clip, "view": view, "consistency": consistency}


def gopro_loss(learner: GOProLearner, views: Tensor, labels: Tensor) -> Tensor:
    """The training objective: two distinct views drawn at random (global RNG, seeded by the loop)."""
    pair = torch.randperm(views.shape[1])[:2].tolist()
    return gopro_losses(learner, views, labels, (pair[0], pair[1]))["total"]


@torch.no_grad()
def encode_views(model, images: Sequence, cfg: GOProConfig | None = None, seed: int = 0,
                 batch_size: int = 256) -> Tensor:
    """Normalized features [N, V, d] of ``cfg.views`` augmented views of each image (random resized
    crop with ``crop_scale``, color jitter, no flip), drawn with ``seed``, through the frozen image tower."""
    cfg = cfg or GOProConfig()
    if len(images) == 0:
        raise ValueError("GOPro needs at least one support image to draw augmented views from")
    transform = image_transform(model.image_size, is_train=True, scale=cfg.crop_scale, jitter=cfg.jitter)
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.stack([transform(im, gen) for im in images for _ in range(cfg.views)])
    device = next(model.parameters()).device
    out = []
    with frozen(model):
        for i in range(0, len(pixels), batch_size):
            out.append(model.encode_image(pixels[i : i + batch_size].to(device)).float().cpu())
    return F.normalize(torch.cat(out), dim=-1).view(len(images), cfg.views, -1)


def fit_gopro(model, tokenizer: Callable, classnames: Sequence[str], views: Tensor, labels: Tensor,
              cfg: GOProConfig | None = None) -> tuple[GOProLearner, dict]:
    """Train GOPro on augmented-view features ``views`` [N, V, d] (:func:`encode_views`) with
    ``labels``; returns the learner and the per-epoch loss plus the final loss terms on the
    first two views and the training top-1 on the mean of the views. The model is frozen."""
    cfg = cfg or GOProConfig()
    if views.ndim != 3 or views.shape[1] < 2:
        raise ValueError(f"views must be [N, V>=2, d] augmented-view features, got shape {tuple(views.shape)}")
    learner = GOProLearner(model, tokenizer, classnames, cfg)
    history = train_prompts(learner, views, labels, gopro_loss, cfg.prompt)
    with torch.no_grad(), frozen(model):
        terms = gopro_losses(learner, views.float(), labels, (0, 1))
    history |= {f"final_{k}": float(v) for k, v in terms.items()}
    mean_view = F.normalize(views.float().mean(1), dim=-1)
    history["train_top1"] = float((learner.logits(mean_view).argmax(1) == labels).float().mean())
    return learner, history
