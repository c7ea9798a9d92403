"""TMM: task-oriented multi-modal mutual learning, on top of CoOp's prompt learner.

"Task-Oriented Multi-Modal Mutual Leaning for Vision-Language Models" (Long et al., ICCV 2023).
Two modules that feed each other, trained with a contrastive (cross-entropy over classes) loss:

- **Class-aware text prompt (CTP)**, image to text. CoCoOp adds the same image token to every
  class's prompt; CTP adds to class c's context only the image information related to c. Here
  the prompt of class c for image x is

      t_c(x) = [SOS] [V_1 + pi_c(x)] ... [V_M + pi_c(x)] [CLASS_c] . [EOS],
      pi_c(x) = h(sqrt(d) * (f(x) ⊙ w_c)),

  with V the shared CoOp context, f(x) the normalized image feature, w_c the normalized
  embedding of class c's initial prompt (frozen, computed once) and h a two-layer meta-net
  (d -> d/r -> width, ReLU) whose last layer starts at zero, so TMM starts as CoOp.
- **Text-guided feature tuning (TFT)**, text to image. The image feature attends over the
  class-aware text features g_c(x) = g(t_c(x)) and adds the result through a learned map A:

      a_c(x) = softmax_c(s <f(x), g_c(x)>),   f~(x) = normalize(f(x) + A sum_c a_c(x) g_c(x)),

  with s the model's logit scale and A [d, d] starting at zero.
- **Loss** (the contrastive alignment of the two augmented representations):

      L = -log softmax_y(s <f~(x), g_c(x)>)   (mean over the batch).

Simplifications, stated here and in docs/adaptation.md: the paper's CTP cross-attends from the
class embeddings to the image encoder's tokens and its TFT is an attention block over the
image tokens; here both work on the global image feature (the adaptation driver caches one
feature per image, the image tower stays frozen), so CTP's class awareness is the element-wise
product with the class embedding and TFT adds one text-guided vector to the global feature.
Training and optimizer follow CoOp (:func:`clipforge.adapt.coop.train_prompts`). Inference costs
C text-tower passes per image (one prompt per class per image), as in CoCoOp and the paper.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .coop import ConditionalPromptLearner, CoOpConfig, check_conditional_options, frozen, train_prompts, zero_last_mlp


@dataclass
class TMMConfig:
    """TMM's options: ``prompt`` is the CoOp part (context, optimizer, epochs; class-specific
    context is refused: CTP supplies the class-specific part), ``meta_ratio`` r of the meta-net's
    hidden width d/r, ``chunk`` images per text-tower call at inference."""

    prompt: CoOpConfig = field(default_factory=CoOpConfig)
    meta_ratio: int = 4
    chunk: int = 64

    def __post_init__(self):
        check_conditional_options(self.prompt, self.meta_ratio, self.chunk,
                                  "TMM uses a shared context (CTP adds the class-specific, image-conditioned part)")


class TMMLearner(ConditionalPromptLearner):
    """CoOp's shared context plus CTP's meta-net and TFT's map A (the trainable parameters)."""

    def __init__(self, model, tokenizer: Callable, classnames: Sequence[str], cfg: TMMConfig | None = None):
        cfg = cfg or TMMConfig()
        super().__init__(model, tokenizer, classnames, cfg.prompt, cfg.chunk)
        self.tmm = cfg
        d, width = int(model.cfg.embed_dim), self.ctx.shape[-1]
        self.meta = zero_last_mlp(d, max(1, d // cfg.meta_ratio), width)
        self.tft = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.tft.weight)
        with torch.no_grad(), frozen(model):
            w = super().text_features().float()
        self.register_buffer("class_embeddings", F.normalize(w, dim=-1))  # w_c, the initial prompts

    def prompt_shift(self, image_features: Tensor) -> Tensor:
        """CTP's pi_c(x) [B, C, width] for normalized image features [B, d]."""
        d = image_features.shape[-1]
        gated = image_features.unsqueeze(1) * self.class_embeddings.unsqueeze(0) * d ** 0.5  # [B, C, d]
        return self.meta(gated.to(self.meta[0].weight.dtype))

    def conditioned_embeddings(self, image_features: Tensor) -> Tensor:
        """Token embeddings of the class-aware prompts t_c(x): [B, C, L, width]."""
        return self.assemble(self.ctx.unsqueeze(0).unsqueeze(0) + self.prompt_shift(image_features).unsqueeze(2))

    def conditioned_text_features(self, image_features: Tensor) -> Tensor:
        """g_c(x) [B, C, d], normalized."""
        return self.encode_prompts(self.conditioned_embeddings(image_features), normalize=True)

    def tuned_image_features(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """TFT's f~(x) [B, d] from f(x) [B, d] and g_c(x) [B, C, d]."""
        scale = self.model.scale().detach()
        attn = torch.softmax(scale * torch.einsum("bd,bcd->bc", image_features, text_features), dim=-1)
        guided = torch.einsum("bc,bcd->bd", attn, text_features)
        return F.normalize(image_features + self.tft(guided), dim=-1)

    def forward(self, image_features: Tensor) -> Tensor:
        """Logits s <f~(x), g_c(x)> [B, C] for normalized image features [B, d]."""
        f = image_features.float()
        g = self.conditioned_text_features(f)
        return self.model.scale().detach() * torch.einsum("bd,bcd->bc", self.tuned_image_features(f, g), g)


def tmm_loss(learner: TMMLearner, features: Tensor, labels: Tensor) -> Tensor:
    """TMM's objective: cross-entropy of the class-aware prompts against the text-tuned image features."""
    return F.cross_entropy(learner(features), labels)


def fit_tmm(model, tokenizer: Callable, classnames: Sequence[str], features: Tensor, labels: Tensor,
            cfg: TMMConfig | None = None) -> tuple[TMMLearner, dict]:
    """Train TMM on normalized image ``features`` [N, d] with ``labels``; returns the learner and
    the per-epoch loss plus the final training top-1. The model is frozen for the duration."""
    cfg = cfg or TMMConfig()
    learner = TMMLearner(model, tokenizer, classnames, cfg)
    history = train_prompts(learner, features, labels, tmm_loss, cfg.prompt)
    history["train_top1"] = float((learner.logits(features.float()).argmax(1) == labels).float().mean())
    return learner, history
