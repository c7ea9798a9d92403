import numpy as np
import pytest

from clipforge.data import COLORS, HELDOUT_PAIRS, LABEL_VIEWS, SHAPES, ShapesDataset, ShapesGenerator, build_dataset


def test_deterministic_by_seed():
    a, b = ShapesGenerator("train", seed=1).sample(7), ShapesGenerator("train", seed=1).sample(7)
    assert np.array_equal(a.image, b.image) and a.captions == b.captions
    c = ShapesGenerator("train", seed=2).sample(7)
    assert not np.array_equal(a.image, c.image)


def test_train_never_contains_heldout_pairs_and_compositional_only_does():
    g = ShapesGenerator("train", seed=0)
    for i in range(400):
        for obj in g.sample(i).objects:
            assert (obj.color, obj.shape) not in HELDOUT_PAIRS
    g = ShapesGenerator("compositional", seed=0)
    for i in range(50):
        s = g.sample(i)
        assert len(s.objects) == 1 and (s.objects[0].color, s.objects[0].shape) in HELDOUT_PAIRS


def test_captions_state_the_ground_truth():
    g = ShapesGenerator("counting", seed=0)
    for i in range(40):
        s = g.sample(i)
        n = len(s.objects)
        word = ["one", "two", "three", "four"][n - 1]
        obj = s.objects[0]
        assert all(word in c and obj.color in c and obj.shape in c for c in s.captions)
        assert s.labels["count"] == n - 1
        assert all(word not in neg for neg in s.negatives["count"])
    g = ShapesGenerator("relations", seed=0)
    for i in range(40):
        s = g.sample(i)
        a, b = s.objects
        cap = s.captions[0]
        if " left of " in cap:
            assert a.x < b.x
        elif " right of " in cap:
            assert a.x > b.x
        elif " above " in cap:
            assert a.y < b.y
        else:
            assert a.y > b.y


def test_image_really_contains_the_colors():
    g = ShapesGenerator("compositional", seed=0, image_size=64)
    for i in range(10):
        s = g.sample(i)
        target = np.array(COLORS[s.objects[0].color])
        dist = np.abs(s.image.reshape(-1, 3).astype(int) - target).sum(axis=1)
        assert (dist < 30).sum() > 20  # a solid patch of the stated color


def test_label_views_and_dataset_items():
    assert LABEL_VIEWS["object"]["classes"][0] == f"{list(COLORS)[0]} {SHAPES[0]}"
    ds = build_dataset("shapes", split="val", size=16, image_size=32)
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype.is_floating_point is False
    assert isinstance(item["captions"], list) and item["captions"]
    lazy = ShapesDataset("val", size=16, image_size=32, cache=False)
    assert (lazy[3]["image"] == item["image"]).all()
    with pytest.raises(IndexError):
        ds[16]
    with pytest.raises(ValueError, match="unknown shapes split"):
        ShapesGenerator("bogus")


def test_class_descriptions_are_the_region_captions_of_each_class():
    from clipforge.data.shapes import COLORS, LABEL_VIEWS, SHAPES, SIZES, ShapesGenerator, class_descriptions

    obj = class_descriptions("object")
    assert obj[LABEL_VIEWS["object"]["classes"].index("red circle")] == ["a small red circle.", "a large red circle."]
    assert [len(d) for d in class_descriptions("shape")] == [len(COLORS) * len(SIZES)] * len(SHAPES)
    assert [len(d) for d in class_descriptions("color")] == [len(SHAPES) * len(SIZES)] * len(COLORS)
    gen = ShapesGenerator("compositional", seed=3, image_size=32)
    for i in range(10):  # every region caption of a held-out object is among its classes' descriptions
        sample = gen.sample(i)
        for o, caption in zip(sample.objects, sample.region_captions):
            for view, cls in (("object", f"{o.color} {o.shape}"), ("shape", o.shape), ("color", o.color)):
                assert caption in class_descriptions(view)[LABEL_VIEWS[view]["classes"].index(cls)]
    with pytest.raises(ValueError, match="not 'count'"):
        class_descriptions("count")
