"""Zero-shot classification (Radford et al., 2021, Sec. 3.1.4).

Each class c gets the prompt-ensembled embedding w_c = normalize(mean_t normalize(f(t(c))))
over templates t; an image x is assigned argmax_c <x, w_c>.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor

from ..metrics import classification_metrics
from .features import encode_texts


def zero_shot_classifier(model, classnames: Sequence[str], templates: Sequence[str], tokenizer: Callable) -> Tensor:
    """[C, d] matrix of normalized, template-averaged class embeddings."""
    texts = [t.format(c) for c in classnames for t in templates]
    emb = F.normalize(encode_texts(model, texts, tokenizer), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def zero_shot_eval(
    model,
    image_features: Tensor,
    labels: Tensor,
    classnames: Sequence[str],
    templates: Sequence[str],
    tokenizer: Callable,
) -> dict:
    classifier = zero_shot_classifier(model, classnames, templates, tokenizer)
    logits = F.normalize(image_features, dim=-1) @ classifier.t()
    out = classification_metrics(logits, labels, len(classnames))
    out["classnames"] = list(classnames)
    return out
