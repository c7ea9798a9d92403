"""Shard writing (resumable, manifest and stats) and the map-style dataset over a shard directory."""
from __future__ import annotations

import json

import pytest
import torch
from datahelpers import make_items

from clipforge.data import DataNotBuiltError, build_dataset
from clipforge.data.formats import ReadStats, encode_png, iter_webdataset
from clipforge.data.shards import ShardDataset, ShardSample, ShardSetWriter

VIEWS = {"kind": {"classes": ["a", "b", "c"], "templates": ["a {}."]},
         "parity": {"classes": ["even", "odd"], "templates": ["{}."]}}


def _samples(n=30, size=16):
    items = make_items(n, size)
    return {it["key"]: it for it in items}


def _producer(items, calls, fail_after=None, skip=()):
    def produce(keys):
        for k in keys:
            if fail_after is not None and len(calls) >= fail_after:
                raise KeyboardInterrupt("simulated interruption")
            calls.append(k)
            if k in skip:
                yield "render_failed"
            else:
                it = items[k]
                yield ShardSample(k, encode_png(it["image"]), it["captions"], it["labels"])
    return produce


def test_write_resume_and_read_back(tmp_path):
    items = _samples()
    keys = sorted(items)
    train, val = keys[:24], keys[24:]
    # interrupted build: shards of ~3 samples; stops after 10 samples
    w = ShardSetWriter(tmp_path, target_bytes=3 * 1400)
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        w.write_split("train", train, _producer(items, calls, fail_after=10, skip={"s005"}))
    complete = sorted(p.name for p in tmp_path.glob("train-*.done.json"))
    assert complete and not (tmp_path / "manifest.json").exists()
    with pytest.raises(DataNotBuiltError, match="did not finish"):
        ShardDataset(tmp_path)
    # resume: only keys after the complete shards are produced again
    calls2: list[str] = []
    w = ShardSetWriter(tmp_path, target_bytes=3 * 1400)
    report = w.write_split("train", train, _producer(items, calls2, skip={"s005"}))
    assert report["resumed_shards"] == len(complete)
    assert calls2 == train[len(train) - len(calls2):] and len(calls2) < len(train)
    assert not list(tmp_path.glob("*.tmp"))
    w.write_split("val", val, _producer(items, [], skip=set()))
    manifest = w.finish("toy", VIEWS, skipped={"no_caption": 2}, info={"image_size": 16})
    assert manifest["splits"]["train"]["count"] == 23 and manifest["splits"]["val"]["count"] == 6
    assert len(manifest["splits"]["train"]["shards"]) > 2
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["skipped"] == {"no_caption": 2, "render_failed": 1}
    assert sum(stats["labels"]["train"]["kind"].values()) == 23
    assert stats["captions"]["per_image"]["n"] == 29

    ds = ShardDataset(tmp_path, split="train")
    assert len(ds) == 23 and ds.classnames == {"kind": ["a", "b", "c"], "parity": ["even", "odd"]}
    got = [ds[i] for i in range(len(ds))]
    assert [g["key"] for g in got] == [k for k in train if k != "s005"]
    for g in got:
        it = items[g["key"]]
        assert torch.equal(g["image"], it["image"]) and g["captions"] == it["captions"] and g["labels"] == it["labels"]
    # the same shards through the streaming webdataset reader
    stats_r = ReadStats()
    assert len(list(iter_webdataset(tmp_path, stats_r, split="val"))) == 6 and stats_r.total_skipped == 0


def test_subset_resize_and_registry(tmp_path, monkeypatch):
    items = _samples(12, size=20)
    w = ShardSetWriter(tmp_path / "toy")
    w.write_split("train", sorted(items), _producer(items, []))
    w.finish("toy", VIEWS)
    a = ShardDataset(tmp_path / "toy", size=5, seed=1)
    b = ShardDataset(tmp_path / "toy", size=5, seed=1)
    c = ShardDataset(tmp_path / "toy", size=5, seed=2)
    assert [a[i]["key"] for i in range(5)] == [b[i]["key"] for i in range(5)] != [c[i]["key"] for i in range(5)]
    assert len(ShardDataset(tmp_path / "toy", size=1000)) == 12  # size is an upper bound
    small = build_dataset("shards", root=tmp_path / "toy", split="train", size=3, seed=0, image_size=8)
    assert small[0]["image"].shape == (3, 8, 8) and small[0]["image"].dtype == torch.uint8
    with pytest.raises(KeyError, match="split 'test'"):
        ShardDataset(tmp_path / "toy", split="test")
    # corpora resolve under $CLIPFORGE_DATA, and name the build command when missing
    monkeypatch.setenv("CLIPFORGE_DATA", str(tmp_path))
    with pytest.raises(DataNotBuiltError) as e:
        build_dataset("openclipart", split="train", size=10, seed=0, image_size=64)
    assert f"clipforge data build openclipart --out {tmp_path / 'openclipart'}" in str(e.value)
    (tmp_path / "toy").rename(tmp_path / "emoji")
    assert len(build_dataset("emoji", split="train", size=4, seed=0, image_size=16)) == 4


def test_dataset_in_dataloader_workers(tmp_path):
    items = _samples(8)
    w = ShardSetWriter(tmp_path)
    w.write_split("train", sorted(items), _producer(items, []))
    w.finish("toy", VIEWS)
    ds = ShardDataset(tmp_path, image_size=16)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=lambda b: [x["key"] for x in b])
    assert sorted(k for batch in loader for k in batch) == sorted(items)


def _multilingual_shards(out):
    items = _samples(4, size=16)
    keys = sorted(items)
    langs = {keys[0]: ["en", "de"], keys[1]: ["de"], keys[2]: ["en", "ja"]}  # keys[3]: untagged

    def produce(ks):
        for k in ks:
            caps = [f"{k} {lang}" for lang in langs[k]] if k in langs else ["untagged"]
            extra = {"caption_langs": langs[k]} if k in langs else {}
            yield ShardSample(k, encode_png(items[k]["image"]), caps, items[k]["labels"], extra=extra)

    w = ShardSetWriter(out)
    w.write_split("train", keys, produce)
    w.finish("ml", VIEWS)
    return keys


def test_languages_filter_captions_and_drop_samples_without_one(tmp_path):
    keys = _multilingual_shards(tmp_path / "ml")
    english = ShardDataset(tmp_path / "ml", languages=["en"])
    got = {english[i]["key"]: english[i]["captions"] for i in range(len(english))}
    # keys[1] has no English caption and is dropped; untagged samples keep theirs
    assert got == {keys[0]: [f"{keys[0]} en"], keys[2]: [f"{keys[2]} en"], keys[3]: ["untagged"]}
    assert len(ShardDataset(tmp_path / "ml")) == 4


def test_training_on_one_language(tmp_path, tiny_cfg, monkeypatch):
    from clipforge.train import load_config, setup, train

    with pytest.raises(ValueError, match="data.languages filters the captions of built corpora"):
        load_config(None, ["data.languages=[en]"])
    keys = _multilingual_shards(tmp_path / "ml")
    built = []
    real = setup.build_dataset
    monkeypatch.setattr(setup, "build_dataset", lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
    tiny_cfg.data.dataset, tiny_cfg.data.root, tiny_cfg.data.languages = "shards", str(tmp_path / "ml"), ["de"]
    tiny_cfg.batch_size, tiny_cfg.steps = 2, 2
    train(tiny_cfg)
    ds = built[0]
    got = {ds[i]["key"]: ds[i]["captions"] for i in range(len(ds))}
    assert got == {keys[0]: [f"{keys[0]} de"], keys[1]: [f"{keys[1]} de"], keys[3]: ["untagged"]}


def test_dataset_captions_read_metadata_only(tmp_path, monkeypatch):
    from clipforge.data.captions import dataset_captions

    keys = _multilingual_shards(tmp_path / "emoji")
    monkeypatch.setenv("CLIPFORGE_DATA", str(tmp_path))
    monkeypatch.setattr(ShardDataset, "__getitem__", lambda *a: pytest.fail("an image was decoded"))
    assert dataset_captions("emoji", languages=["en"]) == [f"{keys[0]} en", f"{keys[2]} en", "untagged"]
    assert dataset_captions("emoji+emoji", languages=["ja"]) == [f"{keys[2]} ja", "untagged"] * 2
