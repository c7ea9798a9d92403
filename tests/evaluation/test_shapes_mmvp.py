"""MMVP-style pairs on shapes (clipforge.evaluation.shapes_mmvp): the rendered pairs differ in exactly the stated
detail, and the pair rule matches a naive loop and a hand-computed case."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipforge.data.shapes import COLORS
from clipforge.evaluation.shapes_mmvp import evaluate_mmvp, mmvp_pairs, pair_accuracy


def _mask(img: torch.Tensor, color: str) -> np.ndarray:
    """Pixels within 30 of the named color (anti-aliased edges excluded)."""
    x = img.permute(1, 2, 0).numpy().astype(int)
    return (np.abs(x - np.array(COLORS[color])).max(-1) < 30)


def test_size_pairs_differ_in_area_and_count_pairs_by_one_object():
    a, b, ta, tb = mmvp_pairs("size", 20, seed=0, image_size=64)
    for i in range(20):
        color = ta[i].split()[2]
        assert ta[i].startswith("a small") and tb[i].startswith("a large") and tb[i].replace("large", "small") == ta[i]
        ratio = _mask(b[i], color).sum() / _mask(a[i], color).sum()
        assert 2.0 < ratio < 4.5  # (0.19 / 0.11)^2 = 2.98
    a, b, ta, tb = mmvp_pairs("count", 20, seed=0, image_size=64)
    words = ["zero", "one", "two", "three", "four"]
    for i in range(20):
        k, color = words.index(ta[i].split()[0]), ta[i].split()[1]
        assert words.index(tb[i].split()[0]) == k + 1
        ratio = _mask(b[i], color).sum() / _mask(a[i], color).sum()
        assert ratio == pytest.approx((k + 1) / k, rel=0.15)


def test_position_pairs_swap_left_and_right():
    a, b, ta, tb = mmvp_pairs("position", 30, seed=1, image_size=64)
    checked = 0
    for i in range(30):
        assert " left of " in ta[i] and ta[i].replace(" left of ", " right of ") == tb[i]
        first, second = ta[i].split(" left of ")
        c1, c2 = first.split()[1], second.split()[1]
        if c1 == c2:
            continue  # same color, different shape: the centroid test below cannot tell them apart
        x1a, x1b = (np.nonzero(_mask(img, c1))[1].mean() for img in (a[i], b[i]))
        assert x1a < 32 < x1b  # the first object is on the left in A and on the right in B
        checked += 1
    assert checked > 15


def test_pair_rule_against_a_naive_loop_and_a_hand_case():
    g = torch.Generator().manual_seed(0)
    fa, fb, ta, tb = (torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1) for _ in range(4))
    naive = np.mean([float(fa[i] @ ta[i]) > float(fa[i] @ tb[i]) and float(fb[i] @ tb[i]) > float(fb[i] @ ta[i])
                     for i in range(50)])
    assert pair_accuracy(fa, fb, ta, tb) == pytest.approx(naive)
    e = torch.eye(2)
    # pair 0: both right; pair 1: image B prefers A's statement -> wrong, though image A is right
    a, b = torch.stack([e[0], e[0]]), torch.stack([e[1], e[0]])
    assert pair_accuracy(a, b, torch.stack([e[0], e[0]]), torch.stack([e[1], e[1]])) == 0.5


def test_evaluate_mmvp_reports_each_category_and_the_mean():
    import clipforge
    from clipforge.tokenizer import get_tokenizer

    torch.manual_seed(0)
    model = clipforge.create_model("tiny", embed_dim=16, vision={"image_size": 32, "patch_size": 8, "width": 16,
                                                                  "layers": 1, "heads": 2},
                                   text={"context_length": 16, "width": 16, "layers": 1, "heads": 2})
    r = evaluate_mmvp(model, get_tokenizer(16), n=10, seed=0)
    assert set(r) == {"mmvp_count", "mmvp_position", "mmvp_size", "mmvp_mean"}
    assert r["mmvp_mean"] == pytest.approx(np.mean([r["mmvp_count"], r["mmvp_position"], r["mmvp_size"]]))
