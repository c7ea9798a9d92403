"""``clipforge data convert``: manifests and image folders to shards, resumable, with skip counts."""
from __future__ import annotations

import json

import pytest
import torch
from datahelpers import make_items

from clipforge.cli.main import main
from clipforge.data import convert as convert_mod
from clipforge.data.convert import convert
from clipforge.data.formats import encode_png, write_image_folder, write_manifest
from clipforge.data.shards import ShardDataset
from clipforge.data.streaming import StreamingLoader, StreamingShards


def _csv_source(root, n=12):
    items = make_items(n, size=16)
    (root / "img").mkdir(parents=True)
    rows = []
    for it in items:
        path = root / "img" / f"{it['key']}.png"
        path.write_bytes(encode_png(it["image"]))
        rows.append({"image": f"img/{it['key']}.png", "captions": it["captions"], "labels": it["labels"]})
    (root / "img" / "s001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")  # corrupt_image
    rows.append({"image": "img/nowhere.png", "captions": ["gone"], "labels": {}})  # missing_image
    rows.append({"image": "img/s000.png", "captions": [], "labels": {}})  # no_caption
    write_manifest(root / "m.csv", rows)
    return {f"m.csv:{i + 1}": it for i, it in enumerate(items)}


def test_csv_manifest_round_trip_with_skips_and_splits(tmp_path):
    by_source = _csv_source(tmp_path / "src")
    manifest = convert(tmp_path / "src" / "m.csv", tmp_path / "out", val_fraction=0.3, progress=False)
    assert manifest["total"] == 11 and set(manifest["splits"]) == {"train", "val"}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["skipped"] == {"corrupt_image": 1, "missing_image": 1, "no_caption": 1}
    assert manifest["label_views"]["kind"]["classes"] == ["0", "1", "2"]
    seen = []
    for split in manifest["splits"]:
        ds = ShardDataset(tmp_path / "out", split=split)
        for i in range(len(ds)):
            got = ds[i]
            src = by_source[ds._meta[ds._keep[i]]["source_key"]]
            assert torch.equal(got["image"], src["image"]) and got["captions"] == src["captions"]
            assert got["labels"] == src["labels"]
            seen.append(src["key"])
    assert sorted(seen) == sorted(k["key"] for k in by_source.values() if k["key"] != "s001")
    # the converted shards stream
    loader = StreamingLoader(StreamingShards(tmp_path / "out", image_size=16, epochs=1), batch_size=4)
    assert sum(b["samples"] for b in loader) == manifest["splits"]["train"]["count"]
    # a rerun finds the finished conversion; another source into the same directory is refused
    assert convert(tmp_path / "src" / "m.csv", tmp_path / "out", val_fraction=0.3, progress=False) == manifest
    with pytest.raises(ValueError, match="already holds"):
        convert(tmp_path / "src" / "m.csv", tmp_path / "out", progress=False)


def test_image_folder_with_labels_and_resize(tmp_path):
    items = make_items(6, size=20)
    for it in items:
        it["key"] = f"{'cats' if int(it['key'][1:]) % 2 else 'dogs'}/{it['key']}"
    write_image_folder(tmp_path / "src", items)
    manifest = convert(tmp_path / "src", tmp_path / "out", image_size=12, label_from_folder=True, progress=False)
    assert manifest["total"] == 6 and manifest["label_views"]["folder"]["classes"] == ["cats", "dogs"]
    ds = ShardDataset(tmp_path / "out")
    for i in range(len(ds)):
        got = ds[i]
        src = next(it for it in items if it["key"] == ds._meta[ds._keep[i]]["source_key"])
        assert got["image"].shape == (3, 12, 12) and got["captions"] == src["captions"]
        assert ds.classnames["folder"][got["labels"]["folder"]] == src["key"].split("/")[0]


def test_interrupted_conversion_resumes(tmp_path, monkeypatch):
    _csv_source(tmp_path / "src", n=30)
    src = tmp_path / "src" / "m.csv"
    full = convert(src, tmp_path / "full", shard_bytes=3000, progress=False)
    calls, interrupt = [], [True]
    real = convert_mod._resized_png

    def flaky(image, size):
        calls.append(1)
        if len(calls) == 12 and interrupt.pop():
            raise KeyboardInterrupt("simulated interruption")
        return real(image, size)

    monkeypatch.setattr(convert_mod, "_resized_png", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "split", shard_bytes=3000, progress=False)
    assert (tmp_path / "split" / "convert-plan.json").exists() and not (tmp_path / "split" / "manifest.json").exists()
    calls.clear()
    interrupt.append(False)
    resumed = convert(src, tmp_path / "split", shard_bytes=3000, progress=False)
    assert 0 < len(calls) < full["total"]  # only the samples after the complete shards were encoded again
    assert resumed["splits"] == full["splits"]
    for a, b in zip(sorted((tmp_path / "full").glob("*.tar")), sorted((tmp_path / "split").glob("*.tar"))):
        assert a.read_bytes() == b.read_bytes()


def test_cli_convert_prints_summary_and_skips(tmp_path, capsys):
    _csv_source(tmp_path / "src")
    assert main(["data", "convert", str(tmp_path / "src" / "m.csv"), "--out", str(tmp_path / "out"),
                 "--shard-size-mb", "0.01", "--val-fraction", "0.2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "11 samples" in out and "corrupt_image" in out and "missing_image" in out and "data.root=" in out
    assert main(["data", "convert", str(tmp_path / "nothing.csv"), "--out", str(tmp_path / "o2")]) == 2


def test_caption_sources_and_negatives_pass_through_convert(tmp_path):
    """HQ-CLIP negative descriptions, LaCLIP rewrites (nested or as top-level fields) and typed negatives stored in
    a WebDataset sample's JSON reach the converted shards and come back from ShardDataset as they were written;
    a malformed source is one bad_row, not a crash."""
    import tarfile

    from clipforge.data.captions import caption_sources, source_negatives
    from clipforge.data.formats import add_tar_member, sample_json

    image = torch.zeros(3, 8, 8, dtype=torch.uint8).permute(1, 2, 0).numpy()
    (tmp_path / "src").mkdir()
    with tarfile.open(tmp_path / "src" / "s-0.tar", "w") as tar:
        add_tar_member(tar, "a.png", encode_png(image))
        add_tar_member(tar, "a.json", sample_json(
            ["a red circle"], caption_sources={"negative_descriptions": ["no square"], "rewrites": ["a circle, red"]},
            short_tags=["circle", "red"], negatives={"color": ["a blue circle"]}))
        add_tar_member(tar, "b.png", encode_png(image))
        add_tar_member(tar, "b.json", sample_json(["a blue square"], caption_sources={"summary": ["x"]}))
        add_tar_member(tar, "c.png", encode_png(image))
        add_tar_member(tar, "c.json", sample_json(["plain"]))
    convert(tmp_path / "src", tmp_path / "out", progress=False)
    ds = ShardDataset(tmp_path / "out", split="train", image_size=None)
    items = {ds[i]["captions"][0]: ds[i] for i in range(len(ds))}
    assert set(items) == {"a red circle", "plain"}  # b: unknown source 'summary', skipped as a bad row
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert "summary" in json.dumps(stats)
    a = items["a red circle"]
    assert caption_sources(a) == {"original": ["a red circle"], "rewrites": ["a circle, red"], "synthetic": [],
                                  "short_tags": ["circle", "red"], "negative_descriptions": ["no square"]}
    assert source_negatives(a) == {"color": ["a blue circle"], "description": ["no square"]}
    assert "caption_sources" not in items["plain"] and "negatives" not in items["plain"]


def test_a_label_column_of_names_becomes_a_view_of_sorted_class_names(tmp_path):
    """``label`` = ``cat`` / ``dog`` (not indices): every row kept, the view's classes are the sorted distinct names
    and each sample's label is its name's index; an empty cell gives no label; a column mixing digits and names
    is all names; integer columns beside it are read as before."""
    items = make_items(7, size=12)
    (tmp_path / "img").mkdir()
    names = ["dog", "cat", "bird", "cat", "", "dog", "7"]
    lines = ["image,caption,label,label_parity"]
    for it, name in zip(items, names):
        (tmp_path / "img" / f"{it['key']}.png").write_bytes(encode_png(it["image"]))
        lines.append(f"img/{it['key']}.png,{it['captions'][0]},{name},{it['labels']['parity']}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    manifest = convert(tmp_path / "m.csv", tmp_path / "out", progress=False)
    assert manifest["total"] == 7
    classes = manifest["label_views"]["label"]["classes"]
    assert classes == ["7", "bird", "cat", "dog"]
    assert manifest["label_views"]["parity"]["classes"] == ["0", "1"]
    ds = ShardDataset(tmp_path / "out", split="train")
    by_caption = {ds[i]["captions"][0]: ds[i]["labels"] for i in range(len(ds))}
    for it, name in zip(items, names):
        labels = by_caption[it["captions"][0]]
        assert labels["parity"] == it["labels"]["parity"]
        assert ("label" not in labels) if name == "" else classes[labels["label"]] == name


def test_a_source_with_no_usable_record_is_refused_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("image,caption\nnowhere/a.png,a cat\nnowhere/b.png,a dog\n")
    with pytest.raises(ValueError, match=r"no usable record.*missing_image': 2.*nowhere/a.png.*image paths"):
        convert(tmp_path / "m.csv", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert main(["data", "convert", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no usable record" in err
