"""SwAV across image and text (SwALIP), the clustering companion of CLIP in "Improved baselines for
vision-language pre-training" (Fini et al. 2023), after Caron et al., "Unsupervised Learning of
Visual Features by Contrasting Cluster Assignments" (2020), eq. 1-3 and the Sinkhorn-Knopp step.

Both modalities are scored against K shared prototypes c_k (unit vectors, trained with the model);
each modality's scores give it soft codes by an equipartitioned optimal transport (Sinkhorn-Knopp),
and each modality must predict the *other* modality's codes (the swapped prediction, the two views
being an image and its caption). With z the normalized embeddings of the global batch of B pairs:

    s_bk = z_b · c_k                                   (scores, image and text separately)
    Q    = SK(exp(s / eps))   : rows scaled to 1/K mass per prototype, columns to 1/B per sample,
                                 repeated ``sinkhorn_iters`` times, columns finally summing to 1
    p_b  = softmax_k(s_bk / tau)
    L    = 1/2 [ -1/B sum_b sum_k Q^text_bk log p^image_bk  -  1/B sum_b sum_k Q^image_bk log p^text_bk ]

The codes carry no gradient. Defaults follow the paper's code (eps = 0.05, tau = 0.1, 3 iterations;
it used 3000 prototypes on YFCC15M, fewer fit the small data here). Simplifications, stated: the
paper's MLP projector is left out (the prototypes score the model's own embeddings), and its
freezing of the prototypes for the first iterations is not applied. Under several processes the
features are gathered, so Q is computed over the global batch (the paper all-reduces the Sinkhorn
sums, the same matrix) and every process computes the same global loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather
from .registry import register
from .validate import check_pairs, parse_options


@dataclass
class SwavConfig:
    embed_dim: int = 128  # the model's embedding dimension (tiny's; ViT-B-32: 512); a mismatch fails at step 1
    num_prototypes: int = 64  # K
    temperature: float = 0.1  # tau of the prediction softmax
    epsilon: float = 0.05  # entropy regularization of the codes
    sinkhorn_iters: int = 3
    seed: int = 0  # initialization of the prototypes

    def __post_init__(self):
        if self.embed_dim < 1:
            raise ValueError(f"swav embed_dim must be the model's embedding dimension (e.g. 128 for tiny), "
                             f"got {self.embed_dim}; set it as the option embed_dim, e.g. "
                             "loss={swav: {weight: 0.2, embed_dim: 128}}")
        if self.num_prototypes < 2:
            raise ValueError(f"swav num_prototypes must be at least 2, got {self.num_prototypes}")
        if self.temperature <= 0 or self.epsilon <= 0:
            raise ValueError(f"swav temperature and epsilon must be positive, got {self.temperature}, {self.epsilon}")
        if self.sinkhorn_iters < 1:
            raise ValueError(f"swav sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")


@torch.no_grad()
def sinkhorn_codes(scores: Tensor, epsilon: float = 0.05, iters: int = 3) -> Tensor:
    """SwAV's Sinkhorn-Knopp codes [B, K] from scores [B, K]: each row (sample) sums to 1, and the
    prototypes share the mass equally up to the last column step."""
    q = torch.exp((scores - scores.max()) / epsilon).t()  # [K, B]; the shift cancels in the normalization
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def swapped_prediction(image_scores: Tensor, text_scores: Tensor, image_codes: Tensor, text_codes: Tensor,
                       temperature: float = 0.1) -> Tensor:
    """1/2 [H(Q^text, p^image) + H(Q^image, p^text)] for given codes (the module docstring's L)."""
    ce_img = -(text_codes * F.log_softmax(image_scores / temperature, dim=-1)).sum(-1).mean()
    ce_txt = -(image_codes * F.log_softmax(text_scores / temperature, dim=-1)).sum(-1).mean()
    return 0.5 * (ce_img + ce_txt)


def swav_loss(image_scores: Tensor, text_scores: Tensor, temperature: float = 0.1, epsilon: float = 0.05,
              iters: int = 3) -> Tensor:
    """Swapped prediction between the two modalities' prototype scores [B, K], with the Sinkhorn codes of
    each (no gradient through the codes)."""
    check_pairs(image_scores, text_scores, "swav", names=("image prototype scores", "text prototype scores"))
    codes = sinkhorn_codes(image_scores, epsilon, iters), sinkhorn_codes(text_scores, epsilon, iters)
    return swapped_prediction(image_scores, text_scores, *codes, temperature)


@register("swav")
class SwavLoss(nn.Module):
    """Registered :func:`swav_loss` with its K trainable prototypes (options: :class:`SwavConfig`), on the
    gathered global batch of ``image_features`` and ``text_features``."""

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(SwavConfig, options, "swav")
        g = torch.Generator().manual_seed(self.cfg.seed)
        self.prototypes = nn.Parameter(torch.randn(self.cfg.num_prototypes, self.cfg.embed_dim, generator=g))

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        c = self.cfg
        img = gather(inputs.image_features, inputs.rank, inputs.world_size)
        txt = gather(inputs.text_features, inputs.rank, inputs.world_size)
        if img.shape[-1] != c.embed_dim:
            raise ValueError(f"swav was built for embed_dim={c.embed_dim} but the features have {img.shape[-1]} "
                             f"dimensions: set the swav option embed_dim={img.shape[-1]}")
        protos = F.normalize(self.prototypes, dim=-1).to(img.dtype)
        z_img, z_txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        return {"loss": swav_loss(z_img @ protos.t(), z_txt @ protos.t(), c.temperature, c.epsilon, c.sinkhorn_iters)}
