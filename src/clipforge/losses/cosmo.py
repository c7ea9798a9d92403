"""COSMO's generation loss over interleaved image-text (Wang et al., 2024, "COSMO: COntrastive Streamlined
MultimOdal Model with Interleaved Pre-Training", the language-modeling term of its objective
``L = L_con + L_lm``).

The model (:class:`clipforge.models.cosmo.Cosmo`) packs image-caption pairs into interleaved sequences and
returns next-token logits ``cosmo_logits`` [G, T, V] of its multimodal half and targets ``cosmo_targets`` [G, T]
(-100 where a position has no next token of its own pair: after each caption's end token, and padding). With
V the set of positions whose target is not -100:

    L_lm = -1/|V| sum_{(g, t) in V} log softmax(logits_{g,t})[target_{g,t}]

(with label smoothing eps: ``-(1 - eps) log p[target] - eps/V sum_v log p[v]``, 0 by default). Per process
(no gathering): under data parallelism it is each process's token mean, as CoCa's caption term. COSMO trains
``loss={clip: 1.0, cosmo_generation: 1.0}``; ``{clip: 1.0}`` alone is its contrastive-only ablation.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .base import LossInputs
from .caption import caption_loss
from .registry import register
from .validate import parse_options

IGNORE = -100  # the model's target for positions without a next token


@dataclass
class CosmoGenerationConfig:
    label_smoothing: float = 0.0  # eps

    def __post_init__(self):
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"cosmo_generation label_smoothing must lie in [0, 1), got {self.label_smoothing}")


def cosmo_generation_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean next-token cross-entropy of ``logits`` [G, T, V] against ``targets`` [G, T], -100 ignored."""
    return caption_loss(logits, targets, pad_id=IGNORE, label_smoothing=label_smoothing)


@register("cosmo_generation")
class CosmoGenerationLoss(nn.Module):
    """Registered :func:`cosmo_generation_loss` (options: :class:`CosmoGenerationConfig`) on a COSMO model's
    ``cosmo_logits`` and ``cosmo_targets``."""

    extra_keys = ("cosmo_logits", "cosmo_targets")

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(CosmoGenerationConfig, options, "cosmo_generation")

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        logits, targets = inputs.extra.get("cosmo_logits"), inputs.extra.get("cosmo_targets")
        if logits is None or targets is None:
            raise KeyError("the cosmo_generation term needs 'cosmo_logits' and 'cosmo_targets', which only a COSMO "
                           "model returns (model=cosmo-tiny model_overrides.cosmo.path=LM_DIR)")
        return {"loss": cosmo_generation_loss(logits, targets, self.cfg.label_smoothing)}
