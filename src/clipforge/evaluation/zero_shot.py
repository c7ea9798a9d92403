"""Zero-shot classification (Radford et al., 2021, Sec. 3.1.4).

Each class c gets the prompt-ensembled embedding w_c = normalize(mean_t normalize(f(t(c))))
over templates t; an image x is assigned argmax_c <x, w_c>.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .features import encode_texts


def zero_shot_classifier(model, classnames: Sequence[str], templates: Sequence[str], tokenizer: Callable) -> Tensor:
    """[C, d] matrix of normalized, template-averaged class embeddings."""
    texts = [t.format(c) for c in classnames for t in templates]
    emb = F.normalize(encode_texts(model, texts, tokenizer), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def classification_metrics(logits: Tensor, labels: Tensor, num_classes: int, topk: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracy, per-class accuracy, balanced accuracy and the confusion matrix."""
    labels = labels.long()
    n = labels.numel()
    result: dict = {"n": n, "num_classes": num_classes, "chance_top1": 1.0 / num_classes}
    ranking = logits.argsort(dim=1, descending=True)
    for k in topk:
        k_eff = min(k, num_classes)
        hit = (ranking[:, :k_eff] == labels[:, None]).any(dim=1).float()
        result[f"top{k}"] = hit.mean().item() if n else 0.0
    pred = ranking[:, 0]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    support = confusion.sum(dim=1)
    per_class = torch.where(support > 0, confusion.diag().float() / support.clamp_min(1), torch.full_like(support, float("nan"), dtype=torch.float))
    result["per_class_accuracy"] = [None if torch.isnan(v) else v.item() for v in per_class]
    present = per_class[~torch.isnan(per_class)]
    result["balanced_accuracy"] = present.mean().item() if present.numel() else 0.0
    result["confusion_matrix"] = confusion.tolist()
    return result


def zero_shot_eval(model, image_features: Tensor, labels: Tensor, classnames: Sequence[str], templates: Sequence[str], tokenizer: Callable) -> dict:
    classifier = zero_shot_classifier(model, classnames, templates, tokenizer)
    logits = F.normalize(image_features, dim=-1) @ classifier.t()
    out = classification_metrics(logits, labels, len(classnames))
    out["classnames"] = list(classnames)
    return out
