"""dHash, hash splits and leakage control on synthetic hashes."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipforge.data.phash import dhash, hamming, min_distances, near_pairs
from clipforge.data.splits import caption_overlap, control_leakage, hash_split


def test_dhash_matches_imagehash():
    imagehash = pytest.importorskip("imagehash", reason="imagehash not installed: nothing to compare with")
    rng = np.random.default_rng(0)
    for _ in range(5):
        img = Image.fromarray(rng.integers(0, 256, (37, 51, 3), dtype=np.uint8))
        assert f"{dhash(img):016x}" == str(imagehash.dhash(img))


def test_dhash_is_stable_under_small_changes():
    x = np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8)
    img = np.stack([x, x.T, 255 - x], axis=-1)
    noisy = np.clip(img.astype(int) + np.random.default_rng(0).integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
    assert hamming(dhash(img), dhash(noisy)) <= 4
    assert hamming(dhash(img), dhash(img[:, ::-1].copy())) > 20


def test_hash_split_is_deterministic_and_proportional():
    splits = [hash_split(f"file{i}.svg") for i in range(5000)]
    assert splits == [hash_split(f"file{i}.svg") for i in range(5000)]
    frac = {s: splits.count(s) / 5000 for s in ("train", "val", "test")}
    assert abs(frac["val"] - 0.1) < 0.02 and abs(frac["test"] - 0.1) < 0.02


def test_leakage_control_moves_whole_groups():
    # a chain 0-1-2 (each step 2 bits; ends 4 apart), a val/test pair 3-4, a loner 5
    h = [0b0, 0b11, 0b1111, 0xFF00, 0xFF01, 0xFFFFFFFF]
    keys = ["a", "b", "c", "d", "e", "f"]
    splits = ["test", "train", "val", "test", "val", "test"]
    new, report = control_leakage(keys, splits, h, max_distance=2)
    assert new == ["train", "train", "train", "test", "test", "test"]
    assert report["moved"] == {"test->train": 1, "val->train": 1, "val->test": 1}
    hashes = np.array(h, dtype=np.uint64)
    train = hashes[[s == "train" for s in new]]
    held = hashes[[s != "train" for s in new]]
    assert min_distances(held, train).min() > 2
    assert len(near_pairs(hashes, hashes, 0)) == 6


def test_caption_overlap():
    rep = caption_overlap([["a cat"], ["a cat", "x"], ["y"]], ["train", "test", "test"])
    assert rep["test"]["captions_also_in_train"] == 1 and rep["test"]["samples_with_a_train_caption"] == 1
