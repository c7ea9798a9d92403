"""GA-DMS: gradient-attention guided masking of noisy caption tokens plus masked-token prediction.

Zheng et al., "Gradient-Attention Guided Dual-Masking Synergetic Framework for Robust Text-based
Person Retrieval" (GA-DMS, EMNLP 2025), Sec. 3: each caption token gets a gradient-attention
similarity score: how much the token's attention weight, times the gradient of the image-text
similarity with respect to that weight, supports matching the caption to its image. Tokens of low
score are treated as noise and masked out of the caption that is aligned with the image; tokens of
high score are informative and are masked and predicted from the image and the rest of the caption.

The score (GASS, Fig. 2b of the paper) is read off the text tower's last attention layer. With
A^h_ij the attention probability of head h from caption i's end-of-text token (whose state is the
caption embedding y_i) to token j, v_i the image embedding and SIM_i = v_i . y_i (both normalized):

    S_g,ij = sum_h A^h_ij * dSIM_i / dA^h_ij        attention times its gradient (w^l . v^l . g^l of the paper)
    S_a,ij = mean_h A^h_ij / sum_{k in C_i} mean_h A^h_ik      the normalized attention to t_eos
    S_ij   = S_a,ij * S_g,ij                         for the content tokens C_i (after the start token,
                                                     before the end token); -inf elsewhere

The ``floor(noise_ratio * n_i)`` content tokens of lowest S are dropped from the caption (the
denoised caption y~_i, re-encoded by the text tower), the ``max(1, round(mask_ratio * n_i))`` of
highest S among the rest are replaced by a mask symbol and re-encoded (states H^m_i), and

    L_align = CLIP's symmetric InfoNCE of (v_i, y~_i) over the gathered batch
    L_mtp   = mean over masked positions of -log softmax(W D(H^m_i, V_i))[token]
    loss    = L_align + mtp * L_mtp

with D one bidirectional transformer decoder layer (self-attention over the masked caption's states,
cross-attention to the image's projected patch tokens V_i) and W a linear map to the vocabulary,
both owned by this term and trained with the model. ``noise_ratio`` and ``mask_ratio`` are options of
the term (:class:`GaDmsConfig`); the training program reads them when it selects the tokens
(train/inputs.py), before the loss is computed.

Simplifications, stated: the score uses the last attention layer only (the paper writes it per
layer l); the gradient is that of each caption's similarity to its own image (the image embedding
held fixed); the mask symbol is the pad token id (the CLIP BPE's "!"); the image-text alignment is
CLIP's InfoNCE instead of the paper's SDM loss; GA-DMS's WebPerson data and its person-retrieval
setting are not part of this.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .fgclip_region import global_infonce
from .gather import gather
from .grain import in_dtype
from .registry import register
from .validate import parse_options

NOISE_RATIO = 0.2  # default fraction of a caption's content tokens dropped as noise
MASK_RATIO = 0.15  # default fraction masked for prediction (at least one)
IGNORE = -100  # target of the positions that are not predicted


def content_mask(ids: Tensor, eot: Tensor, pad_id: int) -> Tensor:
    """[B, L] True at a caption's content tokens: after the start token, before its end token ``eot`` [B]
    (a position), not padding."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    return (positions >= 1) & (positions < eot[:, None]) & (ids != pad_id)


def similarity_gradient(image: Tensor, text: Tensor, attention: Tensor) -> Tensor:
    """dSIM_i / dA [B, heads, L, L] for SIM_i = v_i . y_i, the caption embeddings ``text`` [B, d] computed from
    the attention maps ``attention`` (a node of their autograd graph), the image embeddings [B, d] held fixed.
    Captions are independent in the text tower, so the gradient of the sum is each caption's own."""
    sim = (image.detach().to(text.dtype) * text).sum()
    (grad,) = torch.autograd.grad(sim, attention, retain_graph=False)
    return grad


def ga_scores(attention: Tensor, grad: Tensor, eot: Tensor, content: Tensor) -> Tensor:
    """S_ij [B, L] of the module docstring from the last layer's attention probabilities [B, heads, L, L], their
    gradient ``grad`` (same shape), the end-token positions ``eot`` [B] and the content mask [B, L]; -inf outside
    the content."""
    rows = torch.arange(attention.shape[0], device=attention.device)
    dtype = torch.promote_types(attention.dtype, torch.float32)  # bf16 maps (autocast) are scored in float32
    a, g = attention[rows, :, eot].to(dtype), grad[rows, :, eot].to(dtype)  # [B, heads, L]: t_eos's row
    s_g = (a * g).sum(1)
    s_a = a.mean(1).masked_fill(~content, 0.0)
    s_a = s_a / s_a.sum(1, keepdim=True).clamp_min(torch.finfo(s_a.dtype).tiny)
    return (s_a * s_g).masked_fill(~content, -torch.inf)


def dual_masks(ids: Tensor, scores: Tensor, content: Tensor, pad_id: int, noise_ratio: float = NOISE_RATIO,
               mask_ratio: float = MASK_RATIO) -> tuple[Tensor, Tensor, Tensor]:
    """(denoised ids [B, L], masked ids [B, L], targets [B, L]) for token ids [B, L] with their scores [B, L]
    (:func:`ga_scores`) and content mask. Denoised: the ``floor(noise_ratio * n)`` lowest-scoring content tokens
    removed, the rest shifted left, padded with ``pad_id``. Masked: the ``max(1, round(mask_ratio * n))``
    highest-scoring remaining content tokens replaced by ``pad_id``; targets hold their ids there and
    :data:`IGNORE` elsewhere."""
    content = content.bool()
    scores = scores.masked_fill(~content, -torch.inf)
    n = content.sum(1)
    n_noise = torch.floor(noise_ratio * n.float()).long()
    n_mask = torch.clamp(torch.round(mask_ratio * n.float()).long().clamp(min=1), max=(n - n_noise).clamp(min=0))
    order = scores.argsort(dim=1, stable=True)  # ascending; -inf (non-content) first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(ids.shape[1], device=ids.device).expand_as(order))
    first = ids.shape[1] - n  # rank of the lowest-scoring content token
    noise = content & (rank < (first + n_noise)[:, None])
    informative = content & (rank >= (ids.shape[1] - n_mask)[:, None])
    denoised = torch.full_like(ids, pad_id)
    for i in range(ids.shape[0]):
        kept = ids[i][~noise[i] & (ids[i] != pad_id)]
        denoised[i, :kept.numel()] = kept
    masked = ids.masked_fill(informative, pad_id)
    targets = torch.where(informative, ids, torch.full_like(ids, IGNORE))
    return denoised, masked, targets


class TokenPredictor(nn.Module):
    """D and W of the module docstring: masked caption states [B, L, d] attend to each other and to the
    patch tokens [B, N, d]; logits over the vocabulary [P, V] at the P positions where ``picked`` [B, L] is True
    (row-major; the vocabulary map runs on those positions only)."""

    def __init__(self, dim: int, vocab_size: int, heads: int, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # the same initial head on every process, the global RNG untouched
            torch.manual_seed(seed)
            self.layer = nn.TransformerDecoderLayer(dim, heads if dim % heads == 0 else 1, 2 * dim, dropout=0.0,
                                                    batch_first=True, norm_first=True)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, vocab_size)

    def forward(self, states: Tensor, patches: Tensor, picked: Tensor) -> Tensor:
        return self.head(self.norm(self.layer(states, patches.to(states.dtype)))[picked])


def ga_dms_loss(image_features: Tensor, denoised_text_features: Tensor, logits: Tensor, targets: Tensor, logit_scale,
                mtp: float = 1.0, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
    """L_align + mtp * L_mtp (module docstring); ``targets`` [B, L] are local, ``logits`` [P, V] are those of
    the P positions whose target is not :data:`IGNORE` (row-major); the prediction loss is averaged over the
    masked positions of the gathered batch."""
    l_align = global_infonce(image_features, denoised_text_features, logit_scale, rank, world_size)
    picked = targets != IGNORE
    if logits.shape[0] != int(picked.sum()):
        raise ValueError(f"ga_dms needs logits for the {int(picked.sum())} masked positions, got {logits.shape[0]}")
    count = gather(picked.sum().to(logits.dtype).reshape(1), rank, world_size).sum().detach()
    if count == 0:
        raise ValueError("ga_dms found no caption token to predict; captions need at least one word")
    l_mtp = F.cross_entropy(logits, targets[picked], reduction="sum") * world_size / count
    return {"loss": l_align + mtp * l_mtp, "align": l_align.detach(), "mtp": l_mtp.detach()}


@dataclass
class GaDmsConfig:
    embed_dim: int = 128  # the model's embedding dimension (tiny's; ViT-B-32: 512); a mismatch fails at step 1
    vocab_size: int = 49408  # the text tower's vocabulary (CLIP's BPE)
    heads: int = 4
    mtp: float = 1.0  # weight of the masked-token prediction
    noise_ratio: float = NOISE_RATIO  # fraction of a caption's content tokens dropped as noise (lowest score)
    mask_ratio: float = MASK_RATIO  # fraction of its content tokens masked for prediction (highest; at least one)
    seed: int = 0  # initialization of the token predictor

    def __post_init__(self):
        if self.embed_dim < 1 or self.vocab_size < 2 or self.heads < 1:
            raise ValueError(f"ga_dms needs embed_dim >= 1, vocab_size >= 2, heads >= 1; got {self}")
        if self.mtp < 0:
            raise ValueError(f"ga_dms mtp weight must be >= 0, got {self.mtp}")
        if not 0 <= self.noise_ratio < 1 or not 0 < self.mask_ratio <= 1 or self.noise_ratio + self.mask_ratio > 1:
            raise ValueError(f"ga_dms needs 0 <= noise_ratio < 1, 0 < mask_ratio <= 1 and noise_ratio + mask_ratio "
                             f"<= 1 (fractions of a caption's tokens), got noise_ratio={self.noise_ratio}, "
                             f"mask_ratio={self.mask_ratio}")


@register("ga_dms")
class GaDmsLoss(nn.Module):
    """Registered :func:`ga_dms_loss` with its token predictor (:class:`TokenPredictor`); options
    :class:`GaDmsConfig`. The training program makes the two masked re-encodings (train/inputs.py)."""

    extra_keys = ("ga_dms_text_features", "ga_dms_mtp_tokens", "image_tokens")

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(GaDmsConfig, options, "ga_dms")
        self.predictor = TokenPredictor(self.cfg.embed_dim, self.cfg.vocab_size, self.cfg.heads, self.cfg.seed)

    @property
    def masking_ratios(self) -> tuple[float, float]:
        """(noise_ratio, mask_ratio): what the training program's token selection reads (train/inputs.py)."""
        return self.cfg.noise_ratio, self.cfg.mask_ratio

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        denoised = inputs.require("ga_dms_text_features")
        states, targets = inputs.require("ga_dms_mtp_tokens"), inputs.require("ga_dms_mtp_targets")
        patches = inputs.require("image_tokens")
        if states.shape[-1] != self.cfg.embed_dim:
            raise ValueError(f"ga_dms was built for embed_dim={self.cfg.embed_dim} but the token states have "
                             f"{states.shape[-1]} dimensions: set the ga_dms option embed_dim={states.shape[-1]}")
        if int(targets.max()) >= self.cfg.vocab_size:
            raise ValueError(f"ga_dms was built for vocab_size={self.cfg.vocab_size} but a caption holds token id "
                             f"{int(targets.max())}: set the ga_dms option vocab_size to the text tower's")
        logits = in_dtype(self.predictor, states.dtype, states, patches.to(states.dtype), targets != IGNORE)
        return ga_dms_loss(inputs.image_features, denoised, logits, targets, inputs.logit_scale, self.cfg.mtp,
                           inputs.rank, inputs.world_size)
