"""CLIPN-style learned "no" prompts for out-of-distribution detection, on a frozen CLIP.

"CLIPN for Zero-Shot OOD Detection: Teaching CLIP to Say No" (Wang et al., ICCV 2023).
CLIPN learns "no" prompts and a "no" text encoder; each class c then has a "yes" embedding
w_c (the ordinary prompt) and a "no" embedding n_c, and the probability that image x is
*not* class c is

    p_no(c | x) = exp(<x, n_c>/tau) / (exp(<x, n_c>/tau) + exp(<x, w_c>/tau)).

Training uses the image-text binary-opposite loss (ITBO): the "no" prompt of an image's own
class must say "it is not" weakly, the others strongly,

    L_ITBO = -log(1 - p_no(y | x)) - mean_{c != y} log p_no(c | x),

here with class labels standing in for CLIPN's matched/unmatched captions, plus the text
semantic-opposite loss L_TSO = mean_c | 2 - ||n_c - w_c||_2 | that pushes each "no"
embedding toward the antipode of its "yes" embedding.

What differs from the paper: the text tower stays frozen (CLIPN trains a copy of it as the
"no" encoder on CC3M); only CoOp-style context vectors of the "no" prompts learn, on the
few-shot in-distribution images. The OOD scores are CLIPN's competing-to-win and
agreeing-to-differ (:func:`clipforge.metrics.clipn_scores`); in-distribution images
score high.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..metrics import clipn_scores
from .coop import CoOpConfig, PromptLearner, train_prompts


def _no_prompt_defaults() -> CoOpConfig:
    return CoOpConfig(ctx_init="a picture of no", epochs=50)


@dataclass
class CLIPNConfig:
    """The "no" prompts' learner and loop (``prompt``: a CoOp config, initialized from
    "a picture of no"), the weight of L_TSO, and tau (None: 1 / the model's logit scale)."""

    prompt: CoOpConfig = field(default_factory=_no_prompt_defaults)
    tso_weight: float = 1.0
    temperature: float | None = None


def clipn_loss(yes: Tensor, temperature: float, tso_weight: float) -> Callable[[PromptLearner, Tensor, Tensor], Tensor]:
    """L_ITBO + tso_weight * L_TSO for a learner of "no" prompts against the frozen "yes"
    class embeddings ``yes`` [C, d]."""

    def loss(learner: PromptLearner, features: Tensor, labels: Tensor) -> Tensor:
        no = learner.text_features()
        margin = (features @ no.t() - features @ yes.t()) / temperature  # logit of p_no
        own = F.one_hot(labels, yes.shape[0]).bool()
        keep_own = -F.logsigmoid(-margin[own])  # -log(1 - p_no(y|x))
        others = -F.logsigmoid(margin[~own]).view(len(labels), -1).mean(1) if yes.shape[0] > 1 else 0.0
        itbo = (keep_own + others).mean()
        tso = (2 - (no - yes).norm(dim=-1)).abs().mean()
        return itbo + tso_weight * tso

    return loss


class NoPrompts:
    """Fitted "no" prompts: the frozen "yes" classifier, the learned "no" embeddings and tau."""

    def __init__(self, learner: PromptLearner, yes: Tensor, temperature: float):
        self.learner, self.yes, self.temperature = learner, yes, temperature
        self.no = learner.classifier()

    def scores(self, features: Tensor) -> dict[str, Tensor]:
        """CLIPN's OOD scores ``ctw`` and ``atd`` (higher = in-distribution) for normalized features."""
        return clipn_scores(features.float(), self.yes, self.no, self.temperature)

    def p_no(self, features: Tensor) -> Tensor:
        """p_no(c | x) [N, C]."""
        return torch.sigmoid((features @ self.no.t() - features @ self.yes.t()) / self.temperature)


def fit_clipn(model, tokenizer: Callable, classnames: Sequence[str], yes: Tensor, features: Tensor, labels: Tensor,
              cfg: CLIPNConfig | None = None) -> tuple[NoPrompts, dict]:
    """Learn "no" prompts for ``classnames`` against the "yes" classifier ``yes`` [C, d] (e.g.
    the zero-shot classifier) on in-distribution image ``features`` with ``labels``."""
    cfg = cfg or CLIPNConfig()
    tau = cfg.temperature if cfg.temperature is not None else 1.0 / float(model.scale().detach())
    learner = PromptLearner(model, tokenizer, classnames, cfg.prompt)
    yes = F.normalize(yes.detach().float(), dim=-1)
    history = train_prompts(learner, features, labels, clipn_loss(yes, tau, cfg.tso_weight), cfg.prompt)
    history["temperature"] = tau
    fitted = NoPrompts(learner, yes, tau)
    with torch.no_grad():
        p_no = fitted.p_no(features.float())
        own = F.one_hot(labels.long(), yes.shape[0]).bool()
        history["train_p_no_own"] = float(p_no[own].mean())
        history["train_p_no_other"] = float(p_no[~own].mean()) if yes.shape[0] > 1 else float("nan")
    return fitted, history
