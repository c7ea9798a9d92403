"""Searcher: rankings equal a brute-force numpy reference for both backends; model identity checks."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import clipforge
from clipforge.cli.main import main
from clipforge.serve import ModelMismatchError, Searcher, faiss_available, open_index
from clipforge.serve.search import FaissBackend, NumpyBackend

BACKENDS = [
    "numpy",
    pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")),
]


def reference(emb: np.ndarray, q: np.ndarray, k: int):
    """Brute force: every score, sorted by (-score, id)."""
    scores = emb.astype(np.float64) @ q.astype(np.float64)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    return order, scores[order]


@pytest.fixture
def index_dir(model_dir, image_dir, tmp_path):
    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_and_image_search_match_reference(index_dir, model_dir, image_dir, backend):
    s = Searcher(index_dir, backend=backend)
    assert s.backend.name == backend and len(s) == 10
    emb = open_index(index_dir).embeddings.astype(np.float32)
    model, tok, pre = clipforge.load(model_dir)
    for text in ["a red circle", "two blue squares", "a green star to the left of a triangle"]:
        with torch.no_grad():
            q = model.encode_text(tok([text]))[0].numpy()
        for k in (1, 3, 10, 50):
            hits = s.text(text, k)
            ids, scores = reference(emb, q, k)
            assert [h.id for h in hits] == ids
            np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)
    probe = sorted(image_dir.rglob("img*.jpg"))[0]
    with torch.no_grad():
        q = model.encode_image(pre(clipforge.load_image(probe))[None])[0].numpy()
    hits = s.image(probe, 5)
    ids, scores = reference(emb, q, 5)
    assert [h.id for h in hits] == ids
    np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)
    # an indexed image finds itself first, with cosine ~1 (float16 storage)
    assert hits[0].path == probe.resolve().as_posix() and hits[0].score == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_with_ties(backend):
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((500, 24)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    vec[[7, 90, 311]] = vec[200]  # exact duplicates: ties resolved to the lower id
    b = NumpyBackend(vec) if backend == "numpy" else FaissBackend(vec)
    queries = np.concatenate([vec[[200, 3]], rng.standard_normal((6, 24)).astype(np.float32)])
    for k in (1, 2, 4, 17, 500, 800):
        scores, ids = b.search(queries, k)
        assert ids.shape == (8, min(k, 500))
        for r, q in enumerate(queries):
            ref_ids, ref_scores = reference(vec, q, k)
            np.testing.assert_allclose(scores[r], ref_scores, atol=1e-4)
            # equal up to ids whose scores tie within float32 rounding
            assert [i for i in ids[r]] == ref_ids or np.allclose(vec[ids[r]] @ q, ref_scores, atol=1e-5)
    _, ids = b.search(vec[200], 4)
    assert list(ids[0]) == [7, 90, 200, 311]


def test_similar_classify_and_items(index_dir):
    s = Searcher(index_dir, backend="numpy")
    hits = s.similar(4, k=3)
    assert len(hits) == 3 and 4 not in [h.id for h in hits]
    emb = open_index(index_dir).embeddings.astype(np.float32)
    ids, _ = reference(emb, emb[4], 4)
    assert [h.id for h in hits] == [i for i in ids if i != 4][:3]
    labels = ["circle", "square", "star"]
    probs = s.classify(s.data.meta["path"][0], labels)
    assert sorted(l for l, _ in probs) == labels and sum(p for _, p in probs) == pytest.approx(1.0)
    assert [p for _, p in probs] == sorted((p for _, p in probs), reverse=True)
    img = s.encode_image([s.data.meta["path"][0]])[0]
    txt = s.encode_text([f"a photo of {l}." for l in labels])
    logits = float(s.model.scale().detach()) * txt @ img
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert dict(probs) == pytest.approx(dict(zip(labels, expected)), abs=1e-5)
    data, mime = s.image_bytes(0)
    assert data == open(s.data.meta["path"][0], "rb").read()
    thumb, _ = s.image_bytes(0, max_side=16)
    assert max(clipforge.load_image(thumb).size) == 16
    with pytest.raises(KeyError, match="no item 10"):
        s.item(10)
    with pytest.raises(ValueError, match="empty"):
        s.text("  ")


def test_model_mismatch_names_both_and_the_fix(index_dir, model_dir, other_model_dir):
    with pytest.raises(ModelMismatchError) as e:
        Searcher(index_dir, model=str(other_model_dir))
    msg = str(e.value)
    assert str(model_dir.resolve()) in msg and str(other_model_dir) in msg
    assert "--model" in msg and "--rebuild" in msg
    # the same weights as a loaded tuple are accepted
    s = Searcher(index_dir, model=clipforge.load(model_dir))
    assert len(s.text("a red circle", 2)) == 2


def test_moved_model_asks_for_model(index_dir, model_dir, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(model_dir, moved)
    import json

    m = json.loads((index_dir / "manifest.json").read_text())
    m["model"]["source"] = str(tmp_path / "gone")
    (index_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FileNotFoundError, match="pass the model with --model"):
        Searcher(index_dir)
    assert len(Searcher(index_dir, model=str(moved))) == 10


def test_unknown_index_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index at .*`clipforge index MODEL"):
        Searcher(tmp_path / "missing")


def test_serve_loads_a_bare_state_dict_with_the_options_it_was_indexed_with(image_dir, tmp_path):
    """An index built from an OpenCLIP-layout state dict with no config beside it (``--openai``): the searcher
    cannot load that model by path alone (clipforge.load never guesses the activation), and loads it with the
    same option, as ``clipforge serve --openai`` passes it."""
    from clipforge.interop.keymap import export_state
    from clipforge.interop.openclip_layout import openclip_rules

    model = clipforge.create_model("tiny", seed=0, vision={"act": "quick_gelu"}, text={"act": "quick_gelu"})
    weights = tmp_path / "bare.bin"
    torch.save(export_state(openclip_rules(model.cfg), model.state_dict()), weights)
    out = tmp_path / "idx"
    assert main(["index", str(weights), "--openai", "--images", str(image_dir), "--out", str(out), "--quiet"]) == 0
    with pytest.raises(ValueError, match="model_name"):
        Searcher(out, backend="numpy")
    searcher = Searcher(out, backend="numpy", load_options={"openai": True})
    assert len(searcher.text("a red circle", k=2)) == 2
