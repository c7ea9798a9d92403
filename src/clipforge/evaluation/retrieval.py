"""Image-text retrieval with several captions per image.

``text_to_image[j]`` is the image that caption j describes. Image-to-text R@k counts an
image as retrieved when ANY of its captions ranks in the top k; text-to-image R@k counts a
caption when its image ranks in the top k. Median rank is 1-based.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _log_comb(n: Tensor, r: Tensor) -> Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(r + 1) - torch.lgamma(n - r + 1)


def _hit_probability(greater: Tensor, tied_other: Tensor, tied_own: Tensor, k: int) -> Tensor:
    """P(a relevant item is in the top k) when ``greater`` irrelevant items score strictly higher
    and the best relevant score is shared by ``tied_own`` relevant and ``tied_other`` irrelevant
    items, whose order is random: 1 - C(tied_other, r) / C(tied_other + tied_own, r), r the
    places left in the top k."""
    r = (k - greater).clamp(min=0).minimum(tied_other + tied_own).double()
    other = tied_other.double()
    miss = torch.where(r > other, torch.zeros_like(r), torch.exp(_log_comb(other, r) - _log_comb(other + tied_own, r)))
    return 1 - miss


def retrieval_metrics(
    image_features: Tensor, text_features: Tensor, text_to_image: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict:
    """Recall@k in both directions and median ranks. Tied scores are ordered at random, in
    expectation: a degenerate model whose embeddings are all equal gets chance-level recall,
    not the recall of whatever order a sort leaves ties in."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    t2i_map = text_to_image.long()
    sims = img @ txt.t()  # [N_img, N_txt]
    n_img, n_txt = sims.shape
    own = t2i_map[None, :] == torch.arange(n_img)[:, None]  # [N_img, N_txt] caption j belongs to image i
    has_positive = own.any(dim=1)
    # image -> text: the best of the image's own captions
    best = torch.where(own, sims, torch.full_like(sims, -torch.inf)).max(dim=1).values[:, None]
    i2t_greater = ((sims > best) & ~own).sum(1)
    i2t_tied_other = ((sims == best) & ~own).sum(1)
    i2t_tied_own = ((sims == best) & own).sum(1).clamp(min=1)
    # text -> image: the caption's image among all images
    st = sims.t()  # [N_txt, N_img]
    true = st.gather(1, t2i_map[:, None])
    t2i_greater = (st > true).sum(1)
    t2i_tied_other = (st == true).sum(1) - 1
    ones = torch.ones_like(t2i_greater)
    out: dict = {"num_images": n_img, "num_texts": n_txt}
    for k in ks:
        hit_i = _hit_probability(i2t_greater, i2t_tied_other, i2t_tied_own, k)[has_positive]
        out[f"i2t_R@{k}"] = hit_i.mean().item() if hit_i.numel() else 0.0
        out[f"t2i_R@{k}"] = _hit_probability(t2i_greater, t2i_tied_other, ones, k).mean().item() if n_txt else 0.0
    # expected 1-based ranks under random tie order
    i2t_rank = (i2t_greater + i2t_tied_other / (i2t_tied_own + 1))[has_positive].double()
    t2i_rank = (t2i_greater + t2i_tied_other / 2).double()
    out["i2t_median_rank"] = (i2t_rank.median().item() + 1) if i2t_rank.numel() else float("nan")
    out["t2i_median_rank"] = (t2i_rank.median().item() + 1) if n_txt else float("nan")
    # chance level of R@1: a random ranking puts one of the image's c captions first with prob c / N_txt
    caps_per_image = torch.bincount(t2i_map, minlength=n_img).float()
    out["i2t_R@1_chance"] = (caps_per_image[has_positive] / n_txt).mean().item() if has_positive.any() else 0.0
    out["t2i_R@1_chance"] = 1.0 / n_img
    return out
