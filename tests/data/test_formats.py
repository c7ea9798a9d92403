"""Every format round-trips (same captions, labels and pixels), and bad records are skipped and counted."""
from __future__ import annotations

import json
import tarfile

import pytest
import torch

from clipforge.data.formats import (
    ReadStats,
    add_tar_member,
    encode_png,
    image_folder_classes,
    iter_image_folder,
    iter_manifest,
    iter_source,
    iter_webdataset,
    sample_json,
    write_image_folder,
    write_manifest,
    write_webdataset,
)


def _save_pngs(tmp_path, items, sub="img"):
    (tmp_path / sub).mkdir()
    rows = []
    for it in items:
        p = tmp_path / sub / f"{it['key']}.png"
        p.write_bytes(encode_png(it["image"]))
        rows.append({"image": f"{sub}/{p.name}", "captions": it["captions"], "labels": it["labels"]})
    return rows


def _same(read, items, labels=True):
    assert [r["captions"] for r in read] == [it["captions"] for it in items]
    if labels:
        assert [r["labels"] for r in read] == [it["labels"] for it in items]
    for r, it in zip(read, items):
        assert r["image"].dtype == torch.uint8 and torch.equal(r["image"], it["image"])


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl", "parquet"])
def test_manifest_round_trip(tmp_path, items, ext):
    rows = _save_pngs(tmp_path, items)
    path = write_manifest(tmp_path / f"m.{ext}", rows)
    stats = ReadStats()
    read = list(iter_manifest(path, stats))
    _same(read, items)
    assert stats.read == len(items) and stats.total_skipped == 0


def test_manifest_absolute_paths_and_explicit_columns(tmp_path, items):
    rows = _save_pngs(tmp_path, items)
    for r in rows:
        r["image"] = str(tmp_path / r["image"])
    path = write_manifest(tmp_path / "sub_m.jsonl", rows)
    read = list(iter_manifest(path, caption_columns=["captions"], label_columns={"label_kind": "kind"}))
    assert [r["labels"] for r in read] == [{"kind": it["labels"]["kind"]} for it in items]


def test_manifest_bad_rows_are_counted(tmp_path, items):
    rows = _save_pngs(tmp_path, items[:3])
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [json.dumps({**r, "captions": r["captions"]}) for r in rows]
    lines += [
        "{not json",
        json.dumps({"image": "img/nothere.png", "captions": ["x"]}),
        json.dumps({"image": "img/broken.png", "captions": ["x"]}),
        json.dumps({"image": "img/s000.png", "captions": ["", "  "]}),
        json.dumps({"image": "img/s000.png", "captions": [3]}),
        json.dumps({"image": "img/s000.png", "captions": ["ok"], "label_kind": "cat"}),
        json.dumps({"captions": ["no image"]}),
        json.dumps([1, 2]),
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    read = list(iter_manifest(tmp_path / "m.jsonl", stats))
    assert len(read) == 3 and stats.read == 3
    assert dict(stats.skipped) == {"bad_row": 5, "missing_image": 1, "corrupt_image": 1, "no_caption": 1}


def test_csv_wrong_column_count(tmp_path, items):
    rows = _save_pngs(tmp_path, items[:2])
    path = write_manifest(tmp_path / "m.csv", rows)
    with open(path, "a") as f:
        f.write("img/s000.png,only,too,many,cells,here,and,more\n")
    stats = ReadStats()
    assert len(list(iter_source(path, stats))) == 2
    assert stats.skipped == {"bad_row": 1}


def test_image_folder_round_trip(tmp_path, items):
    nested = [{**it, "key": f"{'ab'[i % 2]}/{it['key']}"} for i, it in enumerate(items)]
    write_image_folder(tmp_path / "f", nested)
    (tmp_path / "f" / "a" / "nocap.png").write_bytes(encode_png(items[0]["image"]))
    (tmp_path / "f" / "b" / "bad.png").write_bytes(b"garbage")
    (tmp_path / "f" / "b" / "bad.txt").write_text("a caption\n")
    stats = ReadStats()
    read = {r["key"]: r for r in iter_image_folder(tmp_path / "f", stats, label_from_folder=True)}
    assert image_folder_classes(tmp_path / "f") == ["a", "b"]
    for i, it in enumerate(nested):
        r = read[it["key"]]
        assert r["captions"] == it["captions"] and torch.equal(r["image"], it["image"])
        assert r["labels"] == {"folder": i % 2}
    assert stats.skipped == {"no_caption": 1, "corrupt_image": 1}


def test_webdataset_round_trip(tmp_path, items):
    for i, it in enumerate(items):
        it["split"] = "train" if i < 4 else "val"
    write_webdataset(tmp_path / "a.tar", items[:3])
    write_webdataset(tmp_path / "b.tar", items[3:])
    stats = ReadStats()
    _same(list(iter_webdataset(tmp_path, stats)), items)
    assert [r["key"] for r in iter_webdataset(tmp_path, split="val")] == ["s004", "s005"]
    assert stats.total_skipped == 0


def test_webdataset_corrupt_samples_and_truncated_shard(tmp_path, items):
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for it in items[:2]:
            add_tar_member(tar, f"{it['key']}.png", encode_png(it["image"]))
            add_tar_member(tar, f"{it['key']}.json", sample_json(it["captions"], it["labels"]))
        add_tar_member(tar, "bad1.png", b"\x89PNG\r\n\x1a\ntruncated")
        add_tar_member(tar, "bad1.json", sample_json(["x"]))
        add_tar_member(tar, "bad2.png", encode_png(items[0]["image"]))
        add_tar_member(tar, "bad2.json", b"{broken")
        add_tar_member(tar, "bad3.png", encode_png(items[0]["image"]))
        add_tar_member(tar, "bad3.json", sample_json([]))
        add_tar_member(tar, "bad4.json", sample_json(["no image"]))
        add_tar_member(tar, "bad5.png", encode_png(items[0]["image"]))
        add_tar_member(tar, "bad5.json", json.dumps({"captions": ["x"], "labels": {"kind": "cat"}}).encode())
    write_webdataset(tmp_path / "b.tar", items[2:5])
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2 + 700])  # cut inside a later member
    write_webdataset(tmp_path / "c.tar", items[5:])
    stats = ReadStats()
    keys = [r["key"] for r in iter_webdataset(tmp_path, stats)]
    assert keys[:2] == ["s000", "s001"] and keys[-1] == "s005"  # read to the end, past the damage
    assert stats.skipped["corrupt_image"] == 1 and stats.skipped["bad_row"] == 2
    assert stats.skipped["no_caption"] == 1 and stats.skipped["missing_image"] == 1
    assert stats.skipped["bad_shard"] == 1
    assert stats.read == len(keys)


def test_oversized_csv_field_and_bad_utf8_jsonl_are_bad_rows(tmp_path, items):
    rows = _save_pngs(tmp_path, items[:2])
    path = write_manifest(tmp_path / "m.csv", rows)
    with open(path, "a") as f:
        f.write('img/s000.png,"' + "x" * 200_000 + '"\n')
        f.write("img/s001.png,fine again,,1,1\n")  # image, caption_0, caption_1, label_kind, label_parity
    stats = ReadStats()
    assert len(list(iter_manifest(path, stats))) == 3
    assert stats.skipped == {"bad_row": 1}
    jl = write_manifest(tmp_path / "m.jsonl", rows)
    with open(jl, "ab") as f:
        f.write(b'{"image": "img/s000.png", "captions": ["\xff\xfe bad bytes"]}\n')
    stats = ReadStats()
    assert len(list(iter_manifest(jl, stats))) == 2 and stats.skipped == {"bad_row": 1}
