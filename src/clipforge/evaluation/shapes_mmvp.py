"""MMVP-style fine-grained visual questions on rendered ``shapes`` scenes.

MMVP-VLM (Tong et al., "Eyes Wide Shut? Exploring the Visual Shortcomings of Multimodal LLMs", CVPR 2024) asks, for a
pair of images that differ in one visual detail, two statements that tell them apart; a pair counts as correct only
when each image is closer to its own statement than to the other's (chance: 1/4). DIVA and un^2CLIP report it. Here
the pairs are rendered with :func:`clipforge.data.shapes.render`, so the difference is exact:

- ``count``: n vs n + 1 identical small objects (n = 1..3), "two red circles." vs "three red circles.";
- ``position``: two objects side by side, then swapped, "a red circle left of a blue square." vs "... right of ...";
- ``size``: one object, small vs large, "a small red circle." vs "a large red circle.".

The statements use the caption templates of the shapes training captions.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.shapes import COLORS, COUNT_WORDS, PLURALS, SHAPES, ShapeObject, object_captions, render

CATEGORIES = ("count", "position", "size")
SLOTS = ((0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73))  # non-overlapping centers for small objects


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def mmvp_pairs(category: str, n: int, seed: int, image_size: int) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """``n`` pairs of one category: (images A [n, 3, S, S] uint8, images B, statements A, statements B)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown MMVP category {category!r}; choose one of {CATEGORIES}")
    rng = np.random.default_rng([seed, CATEGORIES.index(category)])
    colors = list(COLORS)
    a_img, b_img, a_txt, b_txt = [], [], [], []
    for _ in range(n):
        bg = tuple(int(v) for v in rng.integers(0, 60, size=3))
        color, shape = colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))]
        if category == "count":
            k = int(rng.integers(1, 4))
            slots = rng.permutation(len(SLOTS))
            objs = [ShapeObject(shape, color, "small", *SLOTS[s]) for s in slots[:k + 1]]
            scenes = (objs[:k], objs)
            texts = [f"{COUNT_WORDS[m]} {color} {shape if m == 1 else PLURALS[shape]}." for m in (k, k + 1)]
        elif category == "position":
            while True:
                color2, shape2 = colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))]
                if (color2, shape2) != (color, shape):
                    break
            y = float(rng.uniform(0.3, 0.7))
            left, right = (0.25, y), (0.75, y)
            scenes = ([ShapeObject(shape, color, "small", *left), ShapeObject(shape2, color2, "small", *right)],
                      [ShapeObject(shape, color, "small", *right), ShapeObject(shape2, color2, "small", *left)])
            first, second = _a(f"{color} {shape}"), _a(f"{color2} {shape2}")
            texts = [f"{first} left of {second}.", f"{first} right of {second}."]
        else:
            x, y = (float(v) for v in rng.uniform(0.3, 0.7, size=2))
            scenes = ([ShapeObject(shape, color, "small", x, y)], [ShapeObject(shape, color, "large", x, y)])
            texts = [object_captions(color, shape, size)[1] for size in ("small", "large")]
        for objs, out in zip(scenes, (a_img, b_img)):
            out.append(torch.from_numpy(render(objs, image_size, bg)).permute(2, 0, 1))
        a_txt.append(texts[0])
        b_txt.append(texts[1])
    return torch.stack(a_img), torch.stack(b_img), a_txt, b_txt


def pair_accuracy(img_a: Tensor, img_b: Tensor, txt_a: Tensor, txt_b: Tensor) -> float:
    """MMVP-VLM's rule on normalized embeddings: pair i is right when s(a_i, ta_i) > s(a_i, tb_i) and
    s(b_i, tb_i) > s(b_i, ta_i)."""
    ok_a = (img_a * txt_a).sum(-1) > (img_a * txt_b).sum(-1)
    ok_b = (img_b * txt_b).sum(-1) > (img_b * txt_a).sum(-1)
    return float((ok_a & ok_b).float().mean())


@torch.no_grad()
def evaluate_mmvp(model, tokenizer: Callable, n: int = 200, seed: int = 12345) -> dict[str, float]:
    """``mmvp_<category>`` pair accuracy for each category, ``mmvp_mean`` over them (chance 0.25 each)."""
    from ..transforms import normalize

    was = model.training
    model.eval()
    out: dict[str, float] = {}
    for category in CATEGORIES:
        a, b, ta, tb = mmvp_pairs(category, n, seed, model.image_size)
        fa, fb = (F.normalize(model.encode_image(normalize(x.float() / 255)).float(), dim=-1) for x in (a, b))
        ea, eb = (F.normalize(model.encode_text(tokenizer(t)).float(), dim=-1) for t in (ta, tb))
        out[f"mmvp_{category}"] = pair_accuracy(fa, fb, ea, eb)
    out["mmvp_mean"] = float(np.mean([out[f"mmvp_{c}"] for c in CATEGORIES]))
    model.train(was)
    return out


__all__ = ["CATEGORIES", "evaluate_mmvp", "mmvp_pairs", "pair_accuracy"]
