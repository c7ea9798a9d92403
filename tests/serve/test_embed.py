"""clipforge.serve.embed: collections from --images and --dataset, the single-process engine against a
one-image-at-a-time reference, and the CLI's errors for --engine ray that need no Ray."""
from __future__ import annotations

import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipforge.cli.main import main
from clipforge.data.image_files import IMAGE_SUFFIXES
from clipforge.data.shapes import ShapesGenerator
from clipforge.errors import ConfigError, MissingInputError
from clipforge.evaluation.datasets import ImageRef
from clipforge.interop import load
from clipforge.serve.embed import (
    Collection,
    collect_dataset,
    collect_images,
    embed_local,
    read_pixels,
)


@pytest.fixture
def folder(tmp_path):
    """An imagefolder: two class folders of shapes scenes."""
    root = tmp_path / "imgs"
    gen = ShapesGenerator("val", seed=0, image_size=48)
    for i in range(7):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gen.sample(i).image).save(d / f"{i}.png")
    return root


def test_embed_local_matches_one_image_at_a_time(model_dir, folder):
    model, _tok, transform = load(str(model_dir))
    model.eval()
    col = collect_images([str(folder)])
    res = embed_local(model, transform, col, batch_size=3, progress=False)
    assert res.keys == [str(p) for p in sorted(folder.rglob("*.png"))] and res.bad == []
    with torch.no_grad():  # reference: each image alone, decoded with PIL directly
        ref = np.stack([model.encode_image(transform(Image.open(k).convert("RGB"))[None])[0].numpy()
                        for k in res.keys])
    assert res.embeddings.dtype == np.float32 and res.embeddings.shape == ref.shape
    np.testing.assert_allclose(res.embeddings, ref, atol=1e-5)


def test_dataset_spec_gives_the_same_embeddings_keyed_by_the_dataset(model_dir, folder, tmp_path):
    assert main(["embed", str(model_dir), "--images", str(folder), "--quiet",
                 "--out", str(tmp_path / "i.parquet")]) == 0
    assert main(["embed", str(model_dir), "--dataset", f"imagefolder:{folder}", "--quiet",
                 "--out", str(tmp_path / "d.parquet")]) == 0
    by_images, by_dataset = pq.read_table(tmp_path / "i.parquet"), pq.read_table(tmp_path / "d.parquet")
    # imagefolder: keys are paths relative to the folder, classes in sorted order (a/, then b/)
    files = sorted(folder.rglob("*.png"))
    assert by_dataset.column("item").to_pylist() == [p.relative_to(folder).as_posix() for p in files]
    assert by_images.column("item").to_pylist() == [str(p) for p in files]
    np.testing.assert_allclose(np.array(by_dataset.column("embedding").to_pylist()),
                               np.array(by_images.column("embedding").to_pylist()), atol=1e-6)


def test_collection_fingerprint_follows_content_and_order(folder):
    col = collect_images([str(folder)])
    before = col.fingerprint()
    assert collect_images([str(folder)]).fingerprint() == before
    assert Collection(col.keys[::-1], col.refs[::-1]).fingerprint() != before
    Image.new("RGB", (9, 9), (1, 2, 3)).save(col.keys[0])  # rewritten in place: other size
    assert collect_images([str(folder)]).fingerprint() != before


def test_tar_member_that_does_not_decode_names_its_key(tmp_path):
    blob = tmp_path / "x.tar"
    blob.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="sample-7"):
        read_pixels(ImageRef(str(blob), offset=0, size=64), "sample-7", lambda im: im)


def test_bad_collections_and_specs_are_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingInputError, match="no images found"):
        collect_images([str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="shards:DIR"):
        collect_dataset("shapes")
    with pytest.raises(ValueError, match="does not exist"):
        collect_dataset(f"imagefolder:{tmp_path / 'nowhere'}")
    with pytest.raises(MissingInputError, match=r"--images: '.*nowhere\.png' does not exist"):
        collect_images([str(tmp_path / "empty"), str(tmp_path / "nowhere.png")])


def test_an_image_named_twice_is_embedded_once(folder):
    """A file given on its own and again inside its folder (or as another spelling of its path) is one row, at
    its first mention."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    first = files[3]
    col = collect_images([str(first), str(folder), str(folder / ".." / folder.name / first.relative_to(folder))])
    assert col.keys == [str(first)] + [str(f) for f in files if f != first]


def test_engine_ray_refuses_texts_and_devices(model_dir, folder, tmp_path, capsys):
    assert main(["embed", str(model_dir), "--texts", "a cat", "--engine", "ray", "--out", str(tmp_path / "t.npy")]) == 2
    assert "--engine ray embeds images" in capsys.readouterr().err
    assert main(["embed", str(model_dir), "--images", str(folder), "--engine", "ray", "--device", "cuda",
                 "--out", str(tmp_path / "t.npy")]) == 2
    assert "runs its actors on CPUs" in capsys.readouterr().err


def test_engine_ray_without_ray_names_the_extra(model_dir, folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    assert main(["embed", str(model_dir), "--images", str(folder), "--engine", "ray",
                 "--out", str(tmp_path / "e.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install clipforge[ray]" in err
    assert not (tmp_path / "e.npy").exists() and not (tmp_path / "e.npy.blocks").exists()
