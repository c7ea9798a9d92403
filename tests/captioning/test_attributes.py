"""Attribute accuracy on shapes, on hand-written scenes and on real shapes items with their own captions."""
import pytest

from clipforge.captioning import attribute_accuracy
from clipforge.data import build_dataset


def test_hand_cases():
    scenes = [{"kind": "single", "color": "red", "shape": "circle", "count": 1},
              {"kind": "count", "color": "blue", "shape": "square", "count": 3},
              {"kind": "count", "color": "green", "shape": "star", "count": 1},
              {"kind": "relation"}]
    caps = ["a red circle and a blue circle.",  # two colors named: color wrong, shape right
            "three blue squares.",               # all right
            "a green star.",                     # singular, no number word, one object: count right
            "anything"]                          # relation scenes are not scored
    r = attribute_accuracy(caps, scenes)
    assert (r["n_color_shape"], r["n_count"]) == (3, 2)
    assert r["color"] == pytest.approx(2 / 3) and r["shape"] == pytest.approx(1.0) and r["count"] == pytest.approx(1.0)
    r = attribute_accuracy(["a red circle.", "two blue squares.", "green stars.", ""], scenes)
    # 3 objects called "two"; one star called "stars" (plural, no number word): both counts wrong, shapes right
    assert r["count"] == 0.0 and r["shape"] == 1.0
    with pytest.raises(ValueError, match="one caption per scene"):
        attribute_accuracy(["x"], scenes)


def test_ground_truth_captions_of_shapes_score_one():
    ds = build_dataset("shapes", split="val", size=60, seed=3, image_size=32)
    items = [ds[i] for i in range(len(ds))]
    for variant in range(3):  # single scenes have 4 templates, count scenes 3
        r = attribute_accuracy([it["captions"][min(variant, len(it["captions"]) - 1)] for it in items], items)
        assert r["n_color_shape"] > 10 and r["n_count"] > 5
        assert (r["color"], r["shape"], r["count"]) == (1.0, 1.0, 1.0)
