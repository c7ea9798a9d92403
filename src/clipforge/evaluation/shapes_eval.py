"""``evaluate_shapes``: the evaluation the training program runs on ``shapes`` — zero-shot
classification on the held-out ``compositional`` split (color, shape and color+shape views;
those color-shape pairs never occur in training), counting on the ``counting`` split, and
retrieval with all captions of each image on ``val``. It is the ``zero_shot`` and
``retrieval`` tasks of the evaluation suite (:mod:`.suite`) without the embedding cache.
"""
from __future__ import annotations

from typing import Callable

SUMMARY_KEYS = ("top1", "top5", "balanced_accuracy", "chance_top1", "majority_top1", "n", "num_classes")


def evaluate_shapes(model, tokenizer: Callable, size: int = 500, seed: int = 12345, detailed: bool = False) -> dict:
    """Zero-shot and retrieval metrics on held-out ``shapes`` splits. ``seed`` differs from training's."""
    from .suite import run_suite

    res = run_suite(model, tokenizer, tasks=["zero_shot", "retrieval"], dataset="shapes", size=size, seed=seed,
                    cache_dir=None, progress=False).results
    zero_shot = res["zero_shot"]
    if not detailed:
        zero_shot = {task: {k: r[k] for k in SUMMARY_KEYS} for task, r in zero_shot.items()}
    return {"zero_shot": zero_shot, "retrieval": res["retrieval"]}
