"""Regions (boxes + one caption per box) of shapes and of region corpora (clipforge.data.regions)."""
import tarfile

import numpy as np
import pytest
import torch

from clipforge.data import build_dataset
from clipforge.data.convert import convert
from clipforge.data.formats import add_tar_member, encode_png, sample_json
from clipforge.data.regions import RegionError, center_crop_regions, check_regions, regions_from_json
from clipforge.data.shapes import COLORS, ShapesGenerator
from clipforge.data.shards import ShardDataset
from clipforge.tokenizer import get_tokenizer
from clipforge.train.data import TrainItems, make_collate


@pytest.mark.parametrize("split", ["train", "counting", "relations"])
def test_boxes_match_the_rendered_pixels(split):
    """Independent check: the pixels of an object's colour lie inside the boxes of the objects of that
    colour, and each box is tight: drawn (non-background) pixels reach within 2 pixels of its four sides
    (a star's or triangle's tip is thinner than a pixel, so only its anti-aliased trace reaches the box)."""
    size = 64
    gen = ShapesGenerator(split, seed=3, image_size=size)
    for index in range(12):
        s = gen.sample(index)
        boxes = s.boxes
        assert boxes.shape == (len(s.objects), 4)
        for color in {o.color for o in s.objects}:
            close = np.abs(s.image.astype(int) - np.array(COLORS[color])).sum(-1) < 40
            ys, xs = np.nonzero(close)
            mine = boxes[[o.color == color for o in s.objects]] * size  # pixel units
            cx, cy = xs + 0.5, ys + 0.5
            inside = np.zeros(len(xs), bool)
            for x0, y0, x1, y1 in mine:
                inside |= (cx >= x0 - 1) & (cx <= x1 + 1) & (cy >= y0 - 1) & (cy <= y1 + 1)
            assert inside.all(), (split, index, color)
            drawn = np.abs(s.image.astype(int) - s.image[0, 0].astype(int)).sum(-1) > 12
            dy, dx = np.nonzero(drawn)
            dx, dy = dx + 0.5, dy + 0.5
            for x0, y0, x1, y1 in mine:  # tight: drawn pixels touch the box's four sides
                sel = (dx >= x0 - 1) & (dx <= x1 + 1) & (dy >= y0 - 1) & (dy <= y1 + 1)
                assert sel.sum() > 0
                assert dx[sel].min() - x0 < 2 and x1 - dx[sel].max() < 2, (split, index, color)
                assert dy[sel].min() - y0 < 2 and y1 - dy[sel].max() < 2, (split, index, color)


def test_region_captions_use_the_object_templates_and_name_each_object():
    ds = build_dataset("shapes", size=20, seed=1)
    gen = ShapesGenerator("train", seed=1)
    for i in range(20):
        item, s = ds[i], gen.sample(i)
        assert len(item["region_captions"]) == len(item["boxes"]) == len(s.objects)
        for caption, obj in zip(item["region_captions"], s.objects):
            assert caption == f"{'an' if obj.size[0] in 'aeiou' else 'a'} {obj.size} {obj.color} {obj.shape}."
        if s.kind == "single":  # the same template as the image caption of a one-object scene
            assert item["region_captions"][0] in item["captions"]
    long = build_dataset("shapes_long", size=3, seed=1)
    assert np.allclose(long[2]["boxes"], ds[2]["boxes"]) and long[2]["region_captions"] == ds[2]["region_captions"]


@pytest.mark.parametrize("boxes,captions,message", [
    ([[0.1, 0.1, 1.2, 0.5]], ["a"], "outside the image"),
    ([[-0.1, 0.1, 0.5, 0.5]], ["a"], "outside the image"),
    ([[0.5, 0.1, 0.5, 0.6]], ["a"], "is empty"),
    ([[0.5, 0.6, 0.7, 0.2]], ["a"], "is empty"),
    ([[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.4, 0.4]], ["a"], "1 region caption.*2 box.*one caption per box"),
    ([[0.1, 0.1, 0.5]], ["a"], r"shape \[N, 4\]"),
    ([[0.1, 0.1, 0.5, 0.5]], [""], "empty or not a string"),
])
def test_bad_regions_fail_naming_the_problem_and_the_fix(boxes, captions, message):
    with pytest.raises(RegionError, match=message):
        check_regions(boxes, captions)


def test_train_items_deliver_regions_only_when_asked_and_collate_pads_them():
    ds = build_dataset("shapes", size=8, seed=0)
    tok = get_tokenizer(77)
    plain = TrainItems(ds, seed=0, image_size=64)
    assert "boxes" not in plain[(0, 0)]
    items = TrainItems(ds, seed=0, image_size=64, regions=True, max_regions=4)
    batch = make_collate(tok, regions=4)([items[(0, i)] for i in range(8)])
    assert batch["region_boxes"].shape == (8, 4, 4) and batch["region_texts"].shape[:2] == (8, 4)
    for row in range(8):
        n = len(ds[row]["boxes"])
        assert batch["region_mask"][row].tolist() == [j < n for j in range(4)]
        assert torch.allclose(batch["region_boxes"][row, :n], torch.as_tensor(ds[row]["boxes"]))
        assert torch.equal(batch["region_texts"][row, :n], tok(ds[row]["region_captions"]))
    bad = TrainItems([{"image": ds[0]["image"], "captions": ["x"], "boxes": [[0, 0, 2, 1]], "region_captions": ["y"]}],
                     seed=0, image_size=64, regions=True)
    assert "outside the image" in bad[(0, 0)]["error"]


def _region_shard(path, image, regions):
    with tarfile.open(path, "w") as tar:
        add_tar_member(tar, "a.png", encode_png(image))
        add_tar_member(tar, "a.json", sample_json(["a scene"], {}, None, regions=regions))


def test_region_corpus_passes_through_convert_and_moves_with_the_center_crop(tmp_path):
    image = np.zeros((20, 40, 3), np.uint8)  # H=20, W=40: the center crop keeps x in [10, 30)
    regions = {"boxes": [[0.25, 0.0, 0.5, 0.5], [0.0, 0.5, 0.2, 1.0]], "captions": ["left one", "cut away"]}
    (tmp_path / "src").mkdir()
    _region_shard(tmp_path / "src" / "s-0.tar", image, regions)
    convert(tmp_path / "src", tmp_path / "same", progress=False)
    item = ShardDataset(tmp_path / "same", split="train", image_size=None)[0]
    assert np.allclose(item["boxes"], regions["boxes"]) and item["region_captions"] == regions["captions"]
    convert(tmp_path / "src", tmp_path / "crop", image_size=10, progress=False)
    item = ShardDataset(tmp_path / "crop", split="train", image_size=None)[0]
    # x: pixels 10..20 of the 40-wide image -> 0..0.5 of the crop; the second box (pixels 0..8) is cut away
    assert np.allclose(item["boxes"], [[0.0, 0.0, 0.5, 0.5]]) and item["region_captions"] == ["left one"]
    assert center_crop_regions({"boxes": [[0, 0, 0.1, 0.1]], "captions": ["x"]}, 40, 20) is None


def test_a_bad_regions_field_in_a_shard_fails_with_the_sample_named(tmp_path):
    with pytest.raises(RegionError, match="one caption per box"):
        regions_from_json({"boxes": [[0, 0, 1, 1]], "captions": []}, where="shard x: sample 7")
    with pytest.raises(RegionError, match="must be an object"):
        regions_from_json([[0, 0, 1, 1]])


def test_built_shapes_shards_carry_the_regions(tmp_path):
    from clipforge.data.corpora.shapes_shards import build

    build(tmp_path / "s", limit=10, image_size=32, workers=1, progress=False)
    ds = ShardDataset(tmp_path / "s", split="train", image_size=None)
    gen = ShapesGenerator("train", seed=0, image_size=32)
    for i in range(3):
        s = gen.sample(int(ds[i]["key"].rsplit("-", 1)[1]))
        assert np.allclose(ds[i]["boxes"], s.boxes, atol=1e-6) and ds[i]["region_captions"] == s.region_captions
