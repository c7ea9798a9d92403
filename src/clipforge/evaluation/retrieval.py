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


def retrieval_metrics(image_features: Tensor, text_features: Tensor, text_to_image: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    t2i_map = text_to_image.long()
    sims = img @ txt.t()  # [N_img, N_txt]
    n_img, n_txt = sims.shape
    # image -> text: best rank among the image's own captions
    order = sims.argsort(dim=1, descending=True)
    positive = t2i_map[order] == torch.arange(n_img)[:, None]  # [N_img, N_txt] True where the ranked caption belongs
    has_positive = positive.any(dim=1)
    i2t_rank = torch.where(has_positive, positive.float().argmax(dim=1), torch.full((n_img,), n_txt))
    # text -> image: rank of the caption's image
    order_t = sims.t().argsort(dim=1, descending=True)
    t2i_rank = (order_t == t2i_map[:, None]).float().argmax(dim=1)
    out: dict = {"num_images": n_img, "num_texts": n_txt}
    valid = i2t_rank[has_positive]
    for k in ks:
        out[f"i2t_R@{k}"] = (valid < k).float().mean().item() if valid.numel() else 0.0
        out[f"t2i_R@{k}"] = (t2i_rank < k).float().mean().item() if n_txt else 0.0
    out["i2t_median_rank"] = (valid.float().median().item() + 1) if valid.numel() else float("nan")
    out["t2i_median_rank"] = (t2i_rank.float().median().item() + 1) if n_txt else float("nan")
    # chance level of R@1: a random ranking puts one of the image's c captions first with prob c / N_txt
    caps_per_image = torch.bincount(t2i_map, minlength=n_img).float()
    out["i2t_R@1_chance"] = (caps_per_image[has_positive] / n_txt).mean().item() if valid.numel() else 0.0
    out["t2i_R@1_chance"] = 1.0 / n_img
    return out
