"""Corpus builders: small --limit builds of the real corpora, the shared pipeline, and split leakage."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from clipforge.cli.main import main
from clipforge.data.corpora import emoji as emoji_corpus
from clipforge.data.corpora import openclipart
from clipforge.data.corpora.common import MissingSourceError, build_corpus
from clipforge.data.formats import encode_png
from clipforge.data.phash import dhash_hv, min_distances
from clipforge.data.shards import ShardDataset

needs_openclipart = pytest.mark.skipif(
    not os.path.isdir(openclipart.SOURCE),
    reason="Debian package openclipart-svg not installed (apt-get install -y openclipart-svg)",
)
needs_emoji = pytest.mark.skipif(not (os.path.exists(emoji_corpus.FONT) and os.path.exists(emoji_corpus.EMOJI_TEST)),
                                 reason="Debian packages fonts-noto-color-emoji and unicode-data not installed "
                                        "(apt-get install -y fonts-noto-color-emoji unicode-data)")


def _hashes(ds: ShardDataset) -> np.ndarray:
    return np.array([dhash_hv(ds[i]["image"]) for i in range(len(ds))], dtype=np.uint64).reshape(-1, 2)


def assert_no_leakage(root, max_distance: int) -> None:
    """No val/test image has a train image within ``max_distance`` bits (recomputed from the stored pixels)."""
    manifest = json.loads((root / "manifest.json").read_text())
    train = _hashes(ShardDataset(root, "train", image_size=None))
    for split in set(manifest["splits"]) - {"train"}:
        held = _hashes(ShardDataset(root, split, image_size=None))
        if len(held):
            assert min_distances(held, train).min() > max_distance


def test_missing_debian_packages_are_named(tmp_path):
    with pytest.raises(MissingSourceError, match=r"apt-get install -y openclipart-svg"):
        openclipart.build(tmp_path / "oc", source=tmp_path / "nowhere")
    with pytest.raises(MissingSourceError, match=r"apt-get install -y fonts-noto-color-emoji"):
        emoji_corpus.build(tmp_path / "em", font=tmp_path / "none.ttf")
    with pytest.raises(MissingSourceError, match=r"apt-get install -y unicode-data"):
        emoji_corpus.candidates(tmp_path / "emoji-test.txt")


def _toy_prepare(payload, image_size):
    if payload["fail"]:
        return "render_failed"
    rng = np.random.default_rng(payload["seed"])
    base = np.random.default_rng(payload["family"]).integers(0, 256, (image_size, image_size, 3))
    img = np.clip(base + rng.integers(-4, 5, base.shape), 0, 255).astype(np.uint8)  # near duplicates per family
    return {"captions": [f"family {payload['family']}", f"member {payload['seed']}"],
            "labels": {"family": payload["family"] % 3}, "png": encode_png(img), "extra": {}}


def test_pipeline_moves_near_duplicates_and_is_idempotent(tmp_path, caplog):
    cands = [(f"k{i:03d}", {"seed": i, "family": i // 5, "fail": i % 17 == 0}) for i in range(120)]
    views = {"family": {"classes": ["a", "b", "c"], "templates": ["{}"]}}
    m = build_corpus("toy", tmp_path, cands, _toy_prepare, views, image_size=24, workers=1, progress=False)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["skipped"] == {"render_failed": 8} and m["total"] == 112
    assert stats["leakage"]["near_duplicate_groups"] > 0 and stats["leakage"]["moved"]
    assert_no_leakage(tmp_path, 8)
    split_of = {ShardDataset(tmp_path, s)[i]["key"]: s for s in m["splits"] for i in range(m["splits"][s]["count"])}
    for fam in range(24):  # every family sits in one split
        assert len({split_of[f"k{i:03d}"] for i in range(fam * 5, fam * 5 + 5) if f"k{i:03d}" in split_of}) == 1
    with caplog.at_level(logging.INFO, logger="clipforge.data.corpora.common"):
        again = build_corpus("toy", tmp_path, cands, _toy_prepare, views, image_size=24, workers=1, progress=False)
    assert again == m and "already built" in caplog.messages[0]
    with pytest.raises(ValueError, match="different build"):
        build_corpus("toy", tmp_path, cands, _toy_prepare, views, image_size=24, limit=50, workers=1, progress=False)


@needs_openclipart
def test_openclipart_small_build(tmp_path, capsys):
    out = tmp_path / "oc"
    rc = main(["data", "build", "openclipart", "--out", str(out), "--limit", "40", "--image-size", "32",
               "--workers", "2", "--quiet"])
    assert rc == 0 and "openclipart at" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] >= 30 and manifest["license"].startswith("public domain")
    ds = ShardDataset(out, "train", image_size=None)
    assert len(ds.classnames["category"]) == 22 and "animals" in ds.classnames["category"]
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["captions"] and set(item["labels"]) == {"category"}
    assert_no_leakage(out, 8)
    assert main(["data", "info", str(out)]) == 0


@needs_emoji
def test_emoji_small_build(tmp_path):
    out = tmp_path / "em"
    emoji_corpus.build(out, image_size=32, limit=40, workers=1, progress=False)
    ds = ShardDataset(out, "train", image_size=None)
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["samples"].values()) >= 35
    assert set(ds.classnames) == {"group", "subgroup"} and "Smileys & Emotion" in ds.classnames["group"]
    item = ds[0]
    assert set(item["labels"]) == {"group", "subgroup"} and len(item["captions"]) >= 14
    assert {"en", "fr", "ja"} <= set(stats["captions"]["characters_by_language"])
    english = ShardDataset(out, "train", image_size=None, languages=["en"])[0]["captions"]
    assert english[0] == item["captions"][0] and len(english) < len(item["captions"])
    assert_no_leakage(out, 8)


@needs_emoji
def test_emoji_test_parsing_and_captions():
    rows = emoji_corpus.parse_emoji_test(emoji_corpus.EMOJI_TEST)
    first = next(r for r in rows if r["status"] == "fully-qualified")
    assert first["emoji"] == "\U0001F600" and first["name"] == "grinning face" and first["group"] == "Smileys & Emotion"
    caps, langs = emoji_corpus.emoji_captions("\U0001F600", "grinning face")
    assert caps[0] == "grinning face" and langs[0] == "en" and "fr" in langs and len(caps) == len(langs)


@needs_openclipart
def test_svg_metadata_captions():
    path = os.path.join(openclipart.SOURCE, "animals", "bat_orlando_karam_.svg")
    if not os.path.exists(path):
        pytest.skip("this openclipart-svg version lacks the sample file")
    meta = openclipart.svg_metadata(path)
    assert openclipart.captions_from_metadata(meta) == ["bat", "mammal, bat, animal"]


# Near-duplicate drawings that the plain key-hash split puts on both sides of train/held-out (found by hashing a full
# 64-px openclipart build: the same drawing filed under two categories, or an icon and its themed copy).
OPENCLIPART_NEAR_DUPLICATES = [
    "animals/crawfish1_ganson.svg", "food/crawfish1_ganson.svg",
    "animals/fish/seahorse.svg", "computer/icons/etiquette-theme/stock/seahorse.svg",
    "buildings/homes/home0.svg", "computer/icons/lemon-theme/filesystems/home0.svg",
    "buildings/homes/home2.svg", "computer/icons/lemon-theme/filesystems/home2.svg",
    "computer/hardware/computer.svg", "computer/icons/etiquette-theme/stock/computer.svg",
    "animals/bugs/ant.svg", "computer/icons/etiquette-theme/stock/ant.svg",
]
# Skin-tone variants of one glyph are near-duplicates; a few of them hash into val/test, their siblings into train.
EMOJI_NEAR_DUPLICATE_SUBGROUP = "hand-fingers-open"


def _openclipart_subset(src) -> None:
    """The near-duplicate pairs above plus ~40 drawings spread over the corpus, copied with their folders."""
    import shutil

    from clipforge.data.corpora.common import select

    root = os.path.realpath(openclipart.SOURCE)
    spread = [p["rel"] for _, p in select(openclipart.candidates()[0], 40)]
    for rel in dict.fromkeys(OPENCLIPART_NEAR_DUPLICATES + spread):
        if not os.path.isfile(os.path.join(root, rel)):
            pytest.skip(f"this openclipart-svg version lacks {rel}")
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.join(root, rel), src / rel)


def _emoji_subset(path) -> None:
    """emoji-test.txt cut to one subgroup of skin-tone variants plus ~1 in 40 of the other rows (by a hash)."""
    import hashlib

    lines, subgroup = [], ""
    for line in open(emoji_corpus.EMOJI_TEST, encoding="utf-8").read().splitlines():
        if line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        spread = hashlib.sha1(line.encode()).digest()[0] < 256 // 40
        if line.startswith("#") or not line.strip() or subgroup == EMOJI_NEAR_DUPLICATE_SUBGROUP or spread:
            lines.append(line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("name", [pytest.param("openclipart", marks=needs_openclipart),
                                  pytest.param("emoji", marks=needs_emoji)])
def test_built_corpus_has_no_leakage(name, tmp_path):
    """A subset of the corpus, built by its real builder, that holds near-duplicates the plain key-hash split would
    leak into val/test: after the build no val/test image has a train image within the dedup distance
    (recomputed from the stored pixels), and val/test are not empty."""
    from clipforge.data.splits import hash_split

    out = tmp_path / name
    if name == "openclipart":
        _openclipart_subset(tmp_path / "src")
        openclipart.build(out, image_size=64, workers=1, progress=False, source=tmp_path / "src")
    else:
        _emoji_subset(tmp_path / "emoji-test.txt")
        emoji_corpus.build(out, image_size=64, workers=1, progress=False, emoji_test=tmp_path / "emoji-test.txt")
    max_distance = json.loads((out / "stats.json").read_text())["leakage"]["max_distance"]
    assert max_distance == 8
    splits = {s: ShardDataset(out, s, image_size=None) for s in ("train", "val", "test")}
    assert all(len(ds) > 0 for ds in splits.values())
    # the premise: split by key hash alone, some held-out image would have a near duplicate in train
    keys = [ds[i]["key"] for ds in splits.values() for i in range(len(ds))]
    hashes = np.concatenate([_hashes(ds) for ds in splits.values()])
    naive = np.array([hash_split(k) for k in keys])
    assert (min_distances(hashes[naive != "train"], hashes[naive == "train"]) <= max_distance).any()
    assert_no_leakage(out, max_distance)
