"""benchmarks/bench_curation.py, the preparation step of the curation fidelity recipe: the pool holds every sample of
both corpora, the curated set is curate()'s selection of the pooled captions (recomputed here from the sources), and
the uncurated set is a random subset of the pool of exactly the curated size with the same evaluation splits."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from benchhelpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_curation.py")


def _corpus(root: Path, view: str, train: list[str], test: list[str], build: dict) -> None:
    """A toy shard set at ``root`` whose manifest records ``build`` (limit, image_size) as a real build's does."""
    from PIL import Image

    from clipforge.data.shards import ShardSample, ShardSetWriter

    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 7 % 256, i % 3 * 60, 0)).save(buf, format="PNG")
        return buf.getvalue()

    w = ShardSetWriter(root, target_bytes=1500)
    for split, caps in (("train", train), ("test", test)):
        keys = [f"{split}{i:03d}" for i in range(len(caps))]
        samples = {k: ShardSample(k, png(i), [c], {view: i % 2}) for i, (k, c) in enumerate(zip(keys, caps))}
        w.write_split(split, keys, lambda ks, s=samples: (s[k] for k in ks))
    w.finish(root.name, {view: {"classes": ["a", "b"], "templates": ["a {}."]}}, info=build)


@pytest.fixture
def corpora(bench, tmp_path, monkeypatch):
    """Two toy corpora named openclipart and emoji in a data home, built as the recipe needs them: a head entry
    ('cat') and a tail."""
    home = tmp_path / "home"
    oc = [f"a cat drawing {i}" for i in range(24)] + ["a dog", "a tree", "nothing matches"]
    em = ["red apple", "dog face", "grinning face"] + [f"cat face {i}" for i in range(6)]
    _corpus(home / "openclipart", "category", oc, ["a test house"], bench.BUILDS["openclipart"])
    _corpus(home / "emoji", "group", em, ["star", "car"], bench.BUILDS["emoji"])
    monkeypatch.setenv("CLIPFORGE_DATA", str(home))
    return home, oc, em


def test_curated_and_uncurated_sets(bench, corpora, tmp_path):
    from clipforge.data.curation import curate
    from clipforge.data.entries import default_entries
    from clipforge.data.shards import ShardDataset

    home, oc, em = corpora
    keys = [f"openclipart_train{i:03d}" for i in range(len(oc))] + [f"emoji_train{i:03d}" for i in range(len(em))]
    expected = curate([[c] for c in oc + em], default_entries(), t=4, seed=1).indices.tolist()
    assert 4 < len(expected) < len(keys) - 1  # the head entry was balanced down, 'nothing matches' dropped

    curated = ShardDataset(bench.curation_set(tmp_path / "out", "curated", t=4, seed=1))
    assert [curated[i]["key"] for i in range(len(curated))] == [keys[i] for i in expected]
    pool = ShardDataset(tmp_path / "out" / "pool")
    assert [pool[i]["key"] for i in range(len(pool))] == keys
    src = ShardDataset(home / "openclipart")
    assert torch.equal(pool[3]["image"], src[3]["image"]) and pool[3]["captions"] == src[3]["captions"]

    uncurated = ShardDataset(bench.curation_set(tmp_path / "out", "uncurated", t=4, seed=1))
    picked = [uncurated[i]["key"] for i in range(len(uncurated))]
    assert len(picked) == len(expected) and set(picked) <= set(keys) and picked == sorted(picked, key=keys.index)
    for d in (curated, uncurated):
        test = ShardDataset(d.root, split="test")
        assert sorted(test[i]["key"] for i in range(len(test))) == ["emoji_test000", "emoji_test001",
                                                                   "openclipart_test000"]
    with pytest.raises(ValueError, match="kind must be 'curated' or 'uncurated'"):
        bench.curation_set(tmp_path / "out", "random", t=4)


def test_a_corpus_of_another_build_is_built_again_beside_it_once(bench, corpora, monkeypatch):
    """The data home's emoji is the recipe's build and is used; its openclipart is not (rendered at 128 px from every
    drawing, as a plain `clipforge data build openclipart` makes it), so the recipe's build (4,000 drawings at
    64 px) is made once beside it, and a missing one likewise."""
    import clipforge.data.corpora as corpora_module
    from clipforge.data.shards import MANIFEST

    home = corpora[0]
    manifest = json.loads((home / "openclipart" / MANIFEST).read_text())
    (home / "openclipart" / MANIFEST).write_text(json.dumps({**manifest, "limit": None, "image_size": 128}))
    calls = []

    def fake_builder(out, progress=True, **build):
        calls.append((Path(out).name, build))
        _corpus(Path(out), "category", ["a cat"], ["a house"], build)

    monkeypatch.setattr(corpora_module, "get_builder", lambda name: fake_builder)
    assert bench._source("emoji") == home / "emoji"
    assert bench._source("openclipart") == bench._source("openclipart") == home / "openclipart-4000-64px"
    assert calls == [("openclipart-4000-64px", {"limit": 4000, "image_size": 64})]
    shutil.rmtree(home / "emoji")
    assert bench._source("emoji") == home / "emoji-all-128px"
    assert calls[1:] == [("emoji-all-128px", {"limit": None, "image_size": 128})]
