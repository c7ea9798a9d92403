"""Compositionality by hard-negative type (the SugarCrepe / ARO protocol): for an image with a
positive caption and negatives that change one thing (an attribute, an object, a relation,
the word order, the count), the rate at which the positive scores highest, per type."""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import torch
from torch import Tensor


def negative_preference(image_features: Tensor, positive_features: Tensor,
                        negatives: Sequence[Mapping[str, Tensor]]) -> dict:
    """``negatives[i][type]``: [K, d] text features of image i's negatives of that type.

    A sample counts as correct for a type when its positive caption beats every negative of
    that type. Returns accuracy and count per type, the macro average and chance (1/(K+1))."""
    wins, total, chance = defaultdict(float), defaultdict(int), defaultdict(float)
    for i, by_type in enumerate(negatives):
        pos = float(image_features[i] @ positive_features[i])
        for kind, feats in by_type.items():
            if feats.numel() == 0:
                continue
            neg = image_features[i] @ feats.t()
            wins[kind] += float(pos > float(neg.max()))
            total[kind] += 1
            chance[kind] += 1.0 / (feats.shape[0] + 1)
    per_type = {
        k: {"accuracy": wins[k] / total[k], "n": total[k], "chance": chance[k] / total[k]} for k in sorted(total)
    }
    macro = sum(v["accuracy"] for v in per_type.values()) / len(per_type) if per_type else 0.0
    return {"per_type": per_type, "macro_accuracy": macro}


def count_choice_accuracy(image_features: Tensor, count_caption_features: Tensor, true_index: Tensor) -> dict:
    """CountBench protocol: each image chooses among captions that differ only in the number
    (``count_caption_features`` [N, K, d]); accuracy of picking the true count, and chance."""
    scores = torch.einsum("nd,nkd->nk", image_features, count_caption_features)
    pred = scores.argmax(-1)
    return {"accuracy": float((pred == true_index).float().mean()), "chance": 1.0 / count_caption_features.shape[1],
            "n": int(image_features.shape[0])}
