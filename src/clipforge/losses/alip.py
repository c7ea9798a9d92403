"""ALIP: adaptive language-image pre-training with synthetic captions (Yang et al., "ALIP:
Adaptive Language-Image Pre-training with Synthetic Caption", ICCV 2023).

Image i comes with its raw web text t_i and a synthetic caption c_i (an OFA caption,
``extra["synthetic_text_features"]`` [B, d]). Gates computed from the detached features of
the (gathered) batch decide how much each sample and each pair is trusted. Each gate
compares a similarity with its running average mu (an exponential moving average of the
batch mean with momentum m, started at ``init_similarity`` = 1; buffers of the term):

- Language Consistency Gate, per sample: raw text and caption that agree less than usual
  flag a noisy sample,
      w^s_i = min(1, exp(2 (t_i·c_i - mu_tc)))
- Description Consistency Gate, per pair: how well each description fits the image,
      w^t_i = exp(2 (x_i·t_i - mu_xt)),   w^c_i = exp(2 (x_i·c_i - mu_xc)),
  both set to 1 for the samples whose language consistency is at least average
  (t_i·c_i >= mu_tc), as in the official implementation.

The loss weights the per-sample symmetric InfoNCE of both paths,

    CE_sym(x, y)_i = 1/2 [ -log softmax_j(t x_i·y_j)[i] - log softmax_j(t y_i·x_j)[i] ]
    L = mean_i w^s_i w^t_i CE_sym(x, t)_i + mean_i w^s_i w^c_i CE_sym(x, c)_i

(the sum of the raw-text and the caption path, as ALIP trains). The averages are updated
before the gates are computed, in training mode only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather, local_offset
from .registry import register
from .validate import parse_options


@dataclass
class AlipGates:
    """The three gates of the local samples: w^s (sample), w^t (raw-text pair), w^c (caption pair)."""

    sample: Tensor
    raw: Tensor
    caption: Tensor


def alip_gates(x: Tensor, t: Tensor, c: Tensor, means: Tensor) -> AlipGates:
    """Gates from detached features (rows of the batch) and the running averages ``means`` = (mu_tc, mu_xt, mu_xc)."""
    x, t, c = x.detach(), t.detach(), c.detach()
    tc, xt, xc = (t * c).sum(-1), (x * t).sum(-1), (x * c).sum(-1)
    raw_sample = torch.exp(tc - means[0]) ** 2
    consistent = raw_sample >= 1
    one = torch.ones_like(tc)
    return AlipGates(sample=torch.where(consistent, one, raw_sample),
                     raw=torch.where(consistent, one, torch.exp(xt - means[1]) ** 2),
                     caption=torch.where(consistent, one, torch.exp(xc - means[2]) ** 2))


def per_sample_symmetric_ce(x: Tensor, y: Tensor, scale, all_x: Tensor | None = None, all_y: Tensor | None = None,
                            offset: int = 0) -> Tensor:
    """CE_sym(x, y)_i for the local rows against the gathered columns ``all_x``, ``all_y``."""
    all_x = x if all_x is None else all_x
    all_y = y if all_y is None else all_y
    labels = torch.arange(x.shape[0], device=x.device) + offset
    return 0.5 * (F.cross_entropy(scale * x @ all_y.t(), labels, reduction="none")
                  + F.cross_entropy(scale * y @ all_x.t(), labels, reduction="none"))


def alip_loss(image_features: Tensor, text_features: Tensor, caption_features: Tensor, logit_scale, means: Tensor,
              gathered: tuple[Tensor, Tensor, Tensor] | None = None, offset: int = 0,
              gates: AlipGates | None = None) -> Tensor:
    """The ALIP loss of the local rows with running averages ``means`` [3] = (mu_tc, mu_xt, mu_xc);
    ``gathered``: (all images, all texts, all captions) across processes (default: the local batch);
    ``gates``: precomputed gates (default: :func:`alip_gates` of the local rows)."""
    x, t, c = image_features, text_features, caption_features
    if not (x.shape == t.shape == c.shape):
        raise ValueError(f"alip needs image, text and synthetic caption features of one shape [B, d], got "
                         f"{tuple(x.shape)}, {tuple(t.shape)}, {tuple(c.shape)}")
    ax, at, ac = gathered if gathered is not None else (x, t, c)
    w = alip_gates(x, t, c, torch.as_tensor(means, dtype=x.dtype, device=x.device)) if gates is None else gates
    raw = (w.sample * w.raw * per_sample_symmetric_ce(x, t, logit_scale, ax, at, offset)).mean()
    syn = (w.sample * w.caption * per_sample_symmetric_ce(x, c, logit_scale, ax, ac, offset)).mean()
    return raw + syn


@dataclass
class AlipConfig:
    momentum: float = 0.99  # of the running averages, in [0, 1)
    init_similarity: float = 1.0  # their start value

    def __post_init__(self):
        if not 0 <= self.momentum < 1:
            raise ValueError(f"alip momentum must lie in [0, 1), got {self.momentum}")


@register("alip")
class AlipLoss(nn.Module):
    """Registered :func:`alip_loss` (options: :class:`AlipConfig`).

    The running averages (mu_tc, mu_xt, mu_xc) are a buffer, so they are checkpointed; they
    follow the mean over the gathered batch, identical on every process, and move once per
    call in training mode (with ``accum_steps > 1`` the training loop calls the loss once per
    micro-batch: the averages then move that many times per step).
    """

    extra_keys = ("synthetic_text_features",)

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(AlipConfig, options, "alip")
        self.register_buffer("means", torch.full((3,), float(self.cfg.init_similarity)))

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        x, t, c = inputs.image_features, inputs.text_features, inputs.require("synthetic_text_features")
        r, w = inputs.rank, inputs.world_size
        ax, at, ac = gather(x, r, w), gather(t, r, w), gather(c, r, w)
        if self.training:
            with torch.no_grad():
                batch = torch.stack([(at * ac).sum(-1).mean(), (ax * at).sum(-1).mean(), (ax * ac).sum(-1).mean()])
                m = self.cfg.momentum
                self.means = m * self.means + (1 - m) * batch.to(self.means.dtype)
        loss = alip_loss(x, t, c, inputs.logit_scale, self.means, (ax, at, ac), local_offset(x.shape[0], r))
        return {"loss": loss, "mean_text_caption": self.means[0].clone()}
