"""One list of image suffixes: every reader of clipforge finds the same images in a folder, and every listed
suffix decodes (clipforge.data.image_files)."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipforge.data.formats import add_tar_member, image_folder_classes, iter_image_folder, iter_webdataset
from clipforge.data.image_files import IMAGE_SUFFIXES, WDS_IMAGE_KEYS, find_images, is_image_file
from clipforge.evaluation.datasets import load_eval_data
from clipforge.images import load_image
from clipforge.serve.embed import image_paths
from clipforge.serve.index import scan_folders

# PIL's format name for each suffix; every entry is lossless except jpg/jpeg
PIL_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF",
              ".tif": "TIFF", ".tiff": "TIFF"}

# the folder of the reader tests, listed by hand: (relative path, PIL format or None for a non-image)
TREE = [
    ("cats/a.jpg", "JPEG"),
    ("cats/b.PNG", "PNG"),  # an upper-case suffix is an image too
    ("dogs/c.tif", "TIFF"),
    ("dogs/d.tiff", "TIFF"),
    ("dogs/deep/e.bmp", "BMP"),
    ("birds/f.gif", "GIF"),
    ("birds/g.webp", "WEBP"),
    ("birds/notes.md", None),
    ("readme.md", None),
]
IMAGES = sorted(rel for rel, fmt in TREE if fmt)


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if fmt == "GIF":  # GIF is paletted: quantize first, so that decoding gives back the stored colors
        img = img.quantize(colors=256)
    options = {"WEBP": {"lossless": True}, "JPEG": {"quality": 100, "subsampling": 0}}.get(fmt, {})
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "photos"
    for i, (rel, fmt) in enumerate(TREE):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if fmt is None:
            p.write_text("not an image\n")
            continue
        p.write_bytes(_encode(_pixels(i), fmt))
        p.with_suffix(".txt").write_text(f"caption of {rel}\n")
    (root / "birds" / "h.png").mkdir()  # a folder whose name ends in an image suffix is not an image
    return root


def test_the_suffix_list_holds_every_format_clipforge_reads_and_the_webdataset_keys_follow_it():
    assert set(IMAGE_SUFFIXES) == set(PIL_FORMAT)
    assert WDS_IMAGE_KEYS == tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)
    assert is_image_file("x/IMG_0001.JPG") and is_image_file("scan.TIFF") and not is_image_file("a.png.txt")


@pytest.mark.parametrize("suffix", IMAGE_SUFFIXES)
def test_every_listed_suffix_decodes_through_load_image(tmp_path, suffix):
    arr = _pixels(7)
    p = tmp_path / f"x{suffix}"
    p.write_bytes(_encode(arr, PIL_FORMAT[suffix]))
    got = np.asarray(load_image(p))
    assert got.shape == arr.shape
    if PIL_FORMAT[suffix] == "JPEG":
        assert np.abs(got.astype(int) - arr).mean() < 4  # lossy, but the same picture
    else:
        assert np.array_equal(got, arr)


def test_every_reader_finds_the_same_images_in_a_folder(tree):
    want = [tree / rel for rel in IMAGES]
    assert find_images(tree) == want
    # training on a folder of images with caption sidecars
    assert sorted(it["key"] for it in iter_image_folder(tree)) == sorted(rel.rsplit(".", 1)[0] for rel in IMAGES)
    assert image_folder_classes(tree) == ["birds", "cats", "dogs"]
    # clipforge eval --dataset imagefolder:
    data = load_eval_data(f"imagefolder:{tree}")
    assert sorted(data.test.keys) == IMAGES
    # clipforge index --images and clipforge embed/caption --images
    candidates, _ = scan_folders([tree])
    assert sorted(c.row["path"] for c in candidates) == sorted(str(p.resolve()) for p in want)
    assert image_paths([str(tree)]) == want


def test_a_tiff_in_an_image_folder_trains_with_its_own_pixels(tree):
    items = {it["key"]: it for it in iter_image_folder(tree)}
    i = [rel for rel, _ in TREE].index("dogs/c.tif")
    assert np.array_equal(items["dogs/c"]["image"].permute(1, 2, 0).numpy(), _pixels(i))
    assert items["dogs/c"]["captions"] == ["caption of dogs/c.tif"]


@pytest.mark.parametrize("suffix", [".tif", ".bmp", ".gif"])
def test_webdataset_training_shards_read_every_listed_image_member(tmp_path, suffix):
    arr = _pixels(3)
    shard = tmp_path / "000000.tar"
    with tarfile.open(shard, "w") as tar:
        add_tar_member(tar, f"s0{suffix}", _encode(arr, PIL_FORMAT[suffix]))
        add_tar_member(tar, "s0.json", json.dumps({"captions": ["a red square"]}).encode())
    items = list(iter_webdataset(shard))
    assert [it["key"] for it in items] == ["s0"]
    assert np.array_equal(items[0]["image"].permute(1, 2, 0).numpy(), arr)


def test_clip_benchmark_shards_for_eval_read_a_tiff_member(tmp_path):
    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("square\ncircle\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, label in enumerate([1, 0]):
            add_tar_member(tar, f"s{i}.tiff", _encode(_pixels(i), "TIFF"))
            add_tar_member(tar, f"s{i}.cls", f"{label}\n".encode())
    data = load_eval_data(f"wds:{root}")
    assert data.test.keys == ["test/0.tar:s0", "test/0.tar:s1"] and data.test.labels == [1, 0]
    assert np.array_equal(np.asarray(load_image(data.test.refs[0].read())), _pixels(0))
