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
    """Top-k accuracy, per-class accuracy, balanced accuracy and the confusion matrix.

    Tied logits are ordered at random, in expectation: a sample whose true class shares its
    logit with ``e`` other classes, below ``g`` classes, counts P(hit@k) = clip((k - g)/(e + 1), 0, 1),
    so a degenerate classifier (all logits equal) scores chance, not the accuracy of whichever
    class a sort puts first. Without ties this is the usual 0/1 accuracy. The confusion matrix
    counts each sample's argmax."""
    labels = labels.long()
    n = labels.numel()
    result: dict = {"n": n, "num_classes": num_classes, "chance_top1": 1.0 / num_classes,
                    # the top-1 of always answering the most frequent class: the baseline to beat on unbalanced splits
                    "majority_top1": float(torch.bincount(labels, minlength=num_classes).max()) / n if n else 0.0}
    true = logits.gather(1, labels[:, None])
    greater = (logits > true).sum(1)
    tied = (logits == true).sum(1) - 1
    hits = {k: ((min(k, num_classes) - greater) / (tied + 1)).clamp(0, 1).float() for k in topk}
    for k in topk:
        result[f"top{k}"] = hits[k].mean().item() if n else 0.0
    pred = logits.argmax(dim=1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    support = torch.bincount(labels, minlength=num_classes)
    hit1 = hits[topk[0]] if topk[0] == 1 else ((1 - greater) / (tied + 1)).clamp(0, 1).float()
    per_class_sum = torch.zeros(num_classes).index_add_(0, labels, hit1)
    per_class = torch.where(support > 0, per_class_sum / support.clamp_min(1), torch.full((num_classes,), float("nan")))
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
