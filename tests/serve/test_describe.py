"""Vision-free retrieval (clipforge.serve.describe): a description index built by ``clipforge index --describe``
stores MiniLM embeddings of generated descriptions and is searched text-to-text.

The references are written here: all-MiniLM-L6-v2 run through transformers directly with mean pooling over
the attention mask (sentence-transformers' pooling), and the cosine ranking of the paper's s(q, i)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

SMALL = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
         "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}}


def shapes_images(n: int):
    from PIL import Image

    from clipforge.data.shapes import ShapesGenerator

    gen = ShapesGenerator("val", seed=0, image_size=48)
    return [(Image.fromarray(gen.sample(i).image), gen.sample(i).captions[0]) for i in range(n)]


@pytest.fixture(scope="module")
def coca_dir(tmp_path_factory):
    import clipforge
    from clipforge.models import save_model

    return save_model(clipforge.create_model("coca-tiny", seed=0, **SMALL), tmp_path_factory.mktemp("coca") / "m")


@pytest.fixture(scope="module")
def minilm_reference():
    """texts -> unit vectors, written from the model card's recipe (independent of clipforge's encoder)."""
    from transformers import AutoModel, AutoTokenizer

    from clipforge.interop.pretrained import minilm_l6_path

    path = str(minilm_l6_path())
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def encode(texts):
        out = []
        with torch.no_grad():
            for t in texts:  # one at a time: no padding involved at all
                b = tok([t], return_tensors="pt", truncation=True, max_length=128)
                h = model(**b).last_hidden_state[0]
                v = h.mean(0)
                out.append((v / v.norm()).numpy())
        return np.stack(out)

    return encode


@pytest.fixture(scope="module")
def described(coca_dir, tmp_path_factory):
    from clipforge.cli.main import main

    root = tmp_path_factory.mktemp("described")
    images = root / "images"
    images.mkdir()
    for i, (img, caption) in enumerate(shapes_images(6)):
        img.save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(caption)
    out = root / "idx"
    assert main(["index", str(coca_dir), "--describe", "--images", str(images), "--out", str(out), "--quiet",
                 "--dtype", "float32", "--describe-max-len", "8"]) == 0
    return out, images


def test_description_index_stores_minilm_embeddings_of_the_coca_descriptions(described, coca_dir, minilm_reference):
    from clipforge import load
    from clipforge.serve.index import open_index
    from clipforge.tokenizer import get_tokenizer

    out, images = described
    data = open_index(out)
    rec = data.manifest["describe"]
    assert rec["kind"] == "coca" and rec["method"] == "greedy" and rec["sentence_encoder"] == "minilm"
    assert data.manifest["dim"] == 384 and len(data) == 6
    # the descriptions are CoCa's greedy captions of each image (decoded independently here)
    model, _, transform = load(str(coca_dir))
    from clipforge.images import load_image

    tok = get_tokenizer(model.context_length)
    for i, path in enumerate(data.meta["path"]):
        with torch.no_grad():
            ids = model.generate(transform(load_image(path))[None], max_len=8)
        assert data.meta["description"][i] == tok.decode(ids[0].tolist())
    # and each stored vector is MiniLM's mean-pooled, normalized embedding of that description
    ref = minilm_reference(data.meta["description"])
    np.testing.assert_allclose(np.asarray(data.embeddings), ref, atol=1e-5)
    assert data.meta["caption"][0] is not None  # the sidecar caption is kept beside the description


def test_text_search_ranks_by_cosine_in_sentence_space(described, minilm_reference):
    from clipforge.serve.search import Searcher

    out, _ = described
    s = Searcher(out, backend="numpy")
    assert s.index_kind == "describe"
    query = "a red circle and a blue square"
    hits = s.text(query, k=6)
    q = minilm_reference([query])[0]
    expected = minilm_reference(s.data.meta["description"]) @ q
    np.testing.assert_allclose([h.score for h in hits], np.sort(expected)[::-1], atol=1e-5)
    for h in hits:
        assert h.description == s.data.meta["description"][h.id]
        assert abs(h.score - expected[h.id]) < 1e-5


def test_serve_says_which_index_answered(described, model_dir, image_dir, tmp_path):
    from fastapi.testclient import TestClient

    from clipforge.cli.main import main
    from clipforge.serve.app import create_app
    from clipforge.serve.search import Searcher

    out, images = described
    client = TestClient(create_app(Searcher(out, backend="numpy")))
    r = client.get("/search", params={"q": "a green triangle", "k": 3}).json()
    assert r["answered_by"]["index"] == "describe" and r["answered_by"]["sentence_encoder"].endswith("model")
    assert all(isinstance(h["description"], str) for h in r["results"])
    assert client.get("/health").json()["answered_by"]["index"] == "describe"
    with (images / "img0.png").open("rb") as f:  # an image query is described, then searched text-to-text
        r = client.post("/search/image", files={"file": ("q.png", f, "image/png")}, params={"k": 2})
    assert r.status_code == 200 and r.json()["answered_by"]["index"] == "describe"
    with (images / "img0.png").open("rb") as f:
        r = client.post("/classify", files={"file": ("q.png", f, "image/png")}, data={"labels": "a, b"})
    assert r.status_code == 400 and "description index" in r.json()["detail"]
    assert "scene-description index" in client.get("/").text
    # an image-embedding index says so too
    idx = tmp_path / "img"
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(idx), "--quiet"]) == 0
    plain = TestClient(create_app(Searcher(idx, backend="numpy")))
    r = plain.get("/search", params={"q": "a red circle"}).json()
    assert r["answered_by"] == {"index": "image"} and r["results"][0]["description"] is None


def test_describe_refuses_a_model_without_decoder_and_a_changed_describer(described, model_dir, tmp_path, capsys):
    from clipforge.cli.main import main

    out, images = described
    assert main(["index", str(model_dir), "--describe", "--images", str(images), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "without a captioning decoder" in err and "CoCa" in err and "MacCap" in err
    # same captioner, other description settings: the stored descriptions are not comparable
    assert main(["index", str(described[0].parent / "nothing"), "--describe", "--images", str(images),
                 "--out", str(tmp_path / "y")]) == 2
    manifest = json.loads((out / "manifest.json").read_text())
    coca = manifest["describe"]["captioner"]
    assert main(["index", coca, "--describe", "--images", str(images), "--out", str(out), "--quiet",
                 "--dtype", "float32", "--describe-max-len", "6"]) == 2
    assert "describe=" in capsys.readouterr().err
