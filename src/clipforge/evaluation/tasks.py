"""Evaluation tasks for a dataset: which splits, label views and retrieval sets to run.

For ``shapes``: zero-shot classification on the held-out ``compositional`` split (color,
shape and color+shape views; those color-shape pairs never occur in training), counting on
the ``counting`` split, and retrieval with all captions of each image on ``val``.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..data import LABEL_VIEWS, build_dataset
from .features import encode_images, encode_texts
from .retrieval import retrieval_metrics
from .zero_shot import zero_shot_eval

# (task name, split, label view)
SHAPES_ZERO_SHOT = (
    ("object", "compositional", "object"),
    ("shape", "compositional", "shape"),
    ("color", "compositional", "color"),
    ("count", "counting", "count"),
)


def _labelled(ds, view: str):
    images, labels = [], []
    for i in range(len(ds)):
        item = ds[i]
        if view in item["labels"]:
            images.append(item["image"])
            labels.append(item["labels"][view])
    return images, torch.tensor(labels)


def evaluate_shapes(model, tokenizer: Callable, size: int = 500, seed: int = 12345, detailed: bool = False) -> dict:
    """Zero-shot and retrieval metrics on held-out ``shapes`` splits. ``seed`` differs from training's."""
    image_size = model.image_size
    results: dict = {"zero_shot": {}, "retrieval": {}}
    cache: dict[str, tuple] = {}
    for task, split, view in SHAPES_ZERO_SHOT:
        if split not in cache:
            ds = build_dataset("shapes", split=split, size=size, seed=seed, image_size=image_size)
            cache[split] = ds
        images, labels = _labelled(cache[split], view)
        feats = encode_images(model, images)
        spec = LABEL_VIEWS[view]
        r = zero_shot_eval(model, feats, labels, spec["classes"], spec["templates"], tokenizer)
        if not detailed:
            r = {k: r[k] for k in ("top1", "top5", "balanced_accuracy", "chance_top1", "n", "num_classes")}
        results["zero_shot"][task] = r
    ds = build_dataset("shapes", split="val", size=size, seed=seed, image_size=image_size)
    images, texts, owner = [], [], []
    for i in range(len(ds)):
        item = ds[i]
        images.append(item["image"])
        for c in item["captions"]:
            texts.append(c)
            owner.append(i)
    results["retrieval"]["val"] = retrieval_metrics(encode_images(model, images), encode_texts(model, texts, tokenizer), torch.tensor(owner))
    return results
