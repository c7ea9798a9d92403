"""Fixtures for the search service tests: two tiny random models, a folder of shapes images, a shard corpus."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

SMALL = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
         "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}}


def _save_model(path, seed):
    import clipforge
    from clipforge.models import save_model

    return save_model(clipforge.create_model("tiny", seed=seed, **SMALL), path)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A saved random tiny model (random weights suffice: the tests compare rankings with a reference)."""
    return _save_model(tmp_path_factory.mktemp("models") / "a", seed=0)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory):
    """The same architecture with other weights."""
    return _save_model(tmp_path_factory.mktemp("models") / "b", seed=1)


def shapes_images(n: int, seed: int = 0):
    """``n`` procedurally drawn shapes scenes (PIL images, 48 px) with their first caption."""
    from clipforge.data.shapes import ShapesGenerator

    gen = ShapesGenerator("val", seed=seed, image_size=48)
    out = []
    for i in range(n):
        s = gen.sample(i)
        out.append((Image.fromarray(s.image), s.captions[0]))
    return out


@pytest.fixture
def image_dir(tmp_path):
    """10 shapes images in nested folders, as PNG, JPEG and WebP; half with a sidecar caption."""
    root = tmp_path / "images"
    for i, (img, caption) in enumerate(shapes_images(10)):
        sub = root / ("a" if i < 5 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        ext = ("png", "jpg", "webp")[i % 3]
        img.save(sub / f"img{i}.{ext}", quality=95) if ext != "png" else img.save(sub / f"img{i}.{ext}")
        if i % 2 == 0:
            (sub / f"img{i}.txt").write_text(caption + "\n")
    (root / "notes.md").write_text("not an image")  # ignored by suffix
    return root


@pytest.fixture
def corpus_dir(tmp_path):
    """A two-split shard corpus named 'toy' written with ShardSetWriter (captions tagged by language)."""
    from clipforge.data.formats import encode_png
    from clipforge.data.shards import ShardSample, ShardSetWriter

    root = tmp_path / "corpora" / "toy"
    w = ShardSetWriter(root, target_bytes=4000)  # several shards per split
    items = shapes_images(12, seed=3)
    for split, idx in (("train", range(0, 6)), ("test", range(6, 12))):
        keys = [f"s{i:03d}" for i in idx]

        def produce(ks, split=split):
            for k in ks:
                img, cap = items[int(k[1:])]
                yield ShardSample(k, encode_png(np.asarray(img)), [f"eine Form {k}", cap],
                                  extra={"caption_langs": ["de", "en"]})

        w.write_split(split, keys, produce)
    w.finish("toy", label_views={})
    return root


@pytest.fixture
def searcher(model_dir, image_dir, tmp_path):
    """A numpy-backed Searcher over ``image_dir``, indexed by ``clipforge index``."""
    from clipforge.cli.main import main
    from clipforge.serve.search import Searcher

    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(out), "--quiet"]) == 0
    return Searcher(out, backend="numpy")


@pytest.fixture
def client(searcher):
    """A test client of the app over ``searcher``, with a 200 kB upload limit."""
    from fastapi.testclient import TestClient

    from clipforge.serve.app import create_app

    return TestClient(create_app(searcher, max_upload_bytes=200_000))
