"""BYOL across image and text (BYOLIP), the bootstrap companion of CLIP in "Improved baselines for
vision-language pre-training" (Fini et al. 2023), after Grill et al., "Bootstrap Your Own Latent"
(2020), eq. 2.

BYOL trains an online network with a predictor q to predict a target network's representation of
another view; the target's weights are an exponential moving average of the online ones. The paper
makes the two views the two modalities: the predictor on an image's embedding predicts the EMA
model's embedding of its caption, and the predictor on the caption predicts the EMA model's
embedding of the image. With x_i, y_i the model's image and text embeddings, x^T_i, y^T_i the EMA
model's (``extra["ema_image_features"]``, ``extra["ema_text_features"]``, no gradient) and
q_I, q_T the two predictors:

    l(p, t) = 2 - 2 p·t / (|p| |t|)
    L = 1/2 [ 1/B sum_i l(q_I(x_i), y^T_i)  +  1/B sum_i l(q_T(y_i), x^T_i) ]

The EMA model is the training program's (``ema_momentum``; the paper's code uses 0.99), the one
DeGLA's ``ema_distill`` term reads. The predictors are this term's own parameters: a two-layer MLP
(Linear, ReLU, Linear) per direction, which ``clipforge train`` optimizes with the model and keeps in
its checkpoints. Simplifications, stated: the paper's
projector (its own MLP head on the backbone features) and the predictor's batch norm are left out,
so the predictors act on the model's embeddings and the loss is per sample (local to each process,
no gathering). ``predictor=False`` gives the SimSiam-like form without predictors (l(x_i, y^T_i)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .registry import register
from .validate import check_pairs, parse_options


@dataclass
class ByolConfig:
    embed_dim: int = 128  # the model's embedding dimension (tiny's; ViT-B-32: 512); a mismatch fails at step 1
    hidden_dim: int = 512  # the predictors' hidden width
    predictor: bool = True
    seed: int = 0  # initialization of the predictors

    def __post_init__(self):
        self.predictor = bool(self.predictor)
        if self.predictor and self.embed_dim < 1:
            raise ValueError(f"byol embed_dim must be the model's embedding dimension (e.g. 128 for tiny), "
                             f"got {self.embed_dim}; set it as the option embed_dim, e.g. "
                             "loss={byol: {weight: 1.0, embed_dim: 128}}")
        if self.hidden_dim < 1:
            raise ValueError(f"byol hidden_dim must be a positive width, got {self.hidden_dim}")


def regression_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL's l(p, t) = 2 - 2 cos(p, t), averaged over the batch; the target gets no gradient."""
    check_pairs(prediction, target, "byol", names=("prediction", "target"))
    return (2 - 2 * (F.normalize(prediction, dim=-1) * F.normalize(target.detach(), dim=-1)).sum(-1)).mean()


def byol_loss(image_prediction: Tensor, text_prediction: Tensor, ema_image: Tensor, ema_text: Tensor) -> Tensor:
    """The module docstring's L from the predictions q_I(x), q_T(y) and the EMA targets x^T, y^T."""
    return 0.5 * (regression_loss(image_prediction, ema_text) + regression_loss(text_prediction, ema_image))


class Predictor(nn.Module):
    """BYOL's predictor q without its batch norm: Linear(d, h), ReLU, Linear(h, d), initialized from ``seed``
    (every process builds the same one) and applied in the features' dtype (float64 in the tests)."""

    def __init__(self, dim: int, hidden: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        uniform = lambda *shape, fan_in: (torch.rand(*shape, generator=g) * 2 - 1) * fan_in ** -0.5  # noqa: E731
        self.w1, self.b1 = nn.Parameter(uniform(hidden, dim, fan_in=dim)), nn.Parameter(uniform(hidden, fan_in=dim))
        self.w2, self.b2 = nn.Parameter(uniform(dim, hidden, fan_in=hidden)), nn.Parameter(uniform(dim, fan_in=hidden))

    def forward(self, x: Tensor) -> Tensor:
        t = x.dtype
        return F.linear(F.relu(F.linear(x, self.w1.to(t), self.b1.to(t))), self.w2.to(t), self.b2.to(t))


@register("byol")
class ByolLoss(nn.Module):
    """Registered :func:`byol_loss` with its two predictors (options: :class:`ByolConfig`); per sample,
    so local under distribution."""

    extra_keys = ("ema_image_features", "ema_text_features")

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(ByolConfig, options, "byol")
        if self.cfg.predictor:  # the default nn.Linear initialization (uniform, 1/sqrt(fan_in))
            self.image_predictor = Predictor(self.cfg.embed_dim, self.cfg.hidden_dim, self.cfg.seed)
            self.text_predictor = Predictor(self.cfg.embed_dim, self.cfg.hidden_dim, self.cfg.seed + 1)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        x, y = inputs.image_features, inputs.text_features
        if self.cfg.predictor:
            if x.shape[-1] != self.cfg.embed_dim:
                raise ValueError(f"byol was built for embed_dim={self.cfg.embed_dim} but the features have "
                                 f"{x.shape[-1]} dimensions: set the byol option embed_dim={x.shape[-1]}")
            x, y = self.image_predictor(x), self.text_predictor(y)
        return {"loss": byol_loss(x, y, inputs.require("ema_image_features"), inputs.require("ema_text_features"))}
