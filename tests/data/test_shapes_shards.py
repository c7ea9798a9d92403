"""``clipforge data build shapes``: the procedural dataset through the corpus path (shards,
manifest), pixel-identical to the generator, with its splits, labels and typed negatives."""
from __future__ import annotations

import torch

from clipforge.cli.main import main
from clipforge.data import ShapesGenerator, build_dataset
from clipforge.data.formats import ReadStats, iter_webdataset


def test_shapes_builds_into_shards_like_the_generator(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "build", "shapes", "--out", str(out), "--limit", "40", "--image-size", "32", "--quiet"]) == 0
    ds = build_dataset("shards", root=out, split="train", image_size=None)
    assert len(ds) == 40
    gen = ShapesGenerator("train", 0, 32)
    for i in (0, 7, 39):
        item, s = ds[i], gen.sample(i)
        assert torch.equal(item["image"], torch.from_numpy(s.image).permute(2, 0, 1))  # PNG is lossless
        assert item["captions"] == s.captions and item["negatives"] == s.negatives
        assert item["labels"] == ({k: s.labels[k] for k in ("shape", "color", "object")} if s.kind == "single" else {})
    test = build_dataset("shards", root=out, split="test", image_size=None)  # the held-out color-shape pairs
    held = ShapesGenerator("compositional", 0, 32)
    assert len(test) == 4 and all(test[i]["captions"] == held.sample(i).captions for i in range(4))
    assert set(ds.label_views) == {"shape", "color", "object"}
    stats = ReadStats()
    assert len(list(iter_webdataset(out, stats, split="val"))) == 4 and stats.total_skipped == 0
