"""clipforge.load on Hugging Face CLIPModel / SiglipModel directories: parity with transformers.

Randomly initialized transformers models (several shapes and activations) are saved with
save_pretrained, loaded with clipforge.load, and must give the same normalized image and
text embeddings (max abs difference <= 1e-4, fp32). Export back to the HF layout must
round-trip through transformers' from_pretrained.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import clipforge
from clipforge.interop import export_hf

CLIP_CASES = [
    dict(
        patch=8,
        image=32,
        v_width=32,
        v_layers=2,
        v_heads=2,
        t_width=32,
        t_layers=2,
        t_heads=4,
        proj=24,
        act="quick_gelu",
        mlp=64,
    ),
    dict(
        patch=16,
        image=48,
        v_width=48,
        v_layers=1,
        v_heads=3,
        t_width=40,
        t_layers=3,
        t_heads=2,
        proj=16,
        act="gelu",
        mlp=96,
    ),
    dict(
        patch=4,
        image=16,
        v_width=64,
        v_layers=3,
        v_heads=4,
        t_width=64,
        t_layers=1,
        t_heads=8,
        proj=64,
        act="quick_gelu",
        mlp=100,
    ),
]
SIGLIP_CASES = [
    dict(patch=8, image=32, width=32, v_layers=2, heads=2, t_layers=2, act="gelu_pytorch_tanh", mlp=64),
    dict(patch=16, image=64, width=48, v_layers=1, heads=4, t_layers=3, act="gelu", mlp=80),
]
VOCAB, CTX = 99, 12


def text_ids(n=4, eot=VOCAB - 1, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, CTX, dtype=torch.long)
    for i in range(n):
        k = 2 + i * 2
        ids[i, :k] = torch.randint(1, VOCAB - 2, (k,), generator=g)
        ids[i, k] = eot
    return ids


def clip_model(c, eos=VOCAB - 1):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=c["t_width"],
            intermediate_size=c["mlp"],
            num_hidden_layers=c["t_layers"],
            num_attention_heads=c["t_heads"],
            max_position_embeddings=CTX,
            hidden_act=c["act"],
            eos_token_id=eos,
            bos_token_id=0,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=c["v_width"],
            intermediate_size=c["mlp"],
            num_hidden_layers=c["v_layers"],
            num_attention_heads=c["v_heads"],
            image_size=c["image"],
            patch_size=c["patch"],
            hidden_act=c["act"],
        ),
        projection_dim=c["proj"],
    )
    return transformers.CLIPModel(cfg).eval()


def siglip_model(c):
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=c["width"],
            intermediate_size=c["mlp"],
            num_hidden_layers=c["t_layers"],
            num_attention_heads=c["heads"],
            max_position_embeddings=CTX,
            hidden_act=c["act"],
            eos_token_id=VOCAB - 1,
            bos_token_id=0,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=c["width"],
            intermediate_size=c["mlp"],
            num_hidden_layers=c["v_layers"],
            num_attention_heads=c["heads"],
            image_size=c["image"],
            patch_size=c["patch"],
            hidden_act=c["act"],
        ),
    )
    m = transformers.SiglipModel(cfg).eval()
    with torch.no_grad():  # non-trivial scale and bias, so their conversion is checked
        m.logit_scale.fill_(1.7)
        m.logit_bias.fill_(-3.5)
    return m


def hf_features(m, pixels, ids):
    with torch.no_grad():
        img = m.get_image_features(pixel_values=pixels)
        txt = m.get_text_features(input_ids=ids)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)


def ours_features(model, pixels, ids):
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(ids)


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", CLIP_CASES, ids=lambda c: f"p{c['patch']}-w{c['v_width']}-{c['act']}")
def test_hf_clip_parity(tmp_path, case):
    hf = clip_model(case)
    hf.save_pretrained(tmp_path)
    model, tokenizer, preprocess = clipforge.load(str(tmp_path))
    assert model.cfg.vision.patch_size == case["patch"] and model.cfg.embed_dim == case["proj"]
    assert model.cfg.vision.act == case["act"] and model.cfg.text.layers == case["t_layers"]
    pixels = torch.randn(3, 3, case["image"], case["image"])
    ids = text_ids()
    (hi, ht), (oi, ot) = hf_features(hf, pixels, ids), ours_features(model, pixels, ids)
    assert max_diff(hi, oi) <= 1e-4 and max_diff(ht, ot) <= 1e-4
    assert model.scale().item() == pytest.approx(hf.logit_scale.exp().item(), rel=1e-6)


def test_hf_clip_legacy_eos_pools_at_largest_id(tmp_path):
    """transformers' legacy eos_token_id=2 pools at the argmax id; clipforge maps it to the last vocabulary id."""
    hf = clip_model(CLIP_CASES[0], eos=2)
    hf.save_pretrained(tmp_path)
    model, _, _ = clipforge.load(str(tmp_path))
    assert model.cfg.text.eot_token_id == VOCAB - 1
    ids = text_ids()
    assert max_diff(hf_features(hf, torch.randn(1, 3, 32, 32), ids)[1], model.encode_text(ids).detach()) <= 1e-4


@pytest.mark.parametrize("case", SIGLIP_CASES, ids=lambda c: f"p{c['patch']}-w{c['width']}-{c['act']}")
def test_hf_siglip_parity(tmp_path, case):
    hf = siglip_model(case)
    hf.save_pretrained(tmp_path)
    model, tokenizer, preprocess = clipforge.load(str(tmp_path))
    assert not model.cfg.vision.class_token and model.cfg.vision.pool == "map" and not model.cfg.text.causal
    pixels = torch.randn(2, 3, case["image"], case["image"])
    ids = text_ids(eot=1)
    ids[ids == 0] = 1  # SigLIP pads with a real token and attends to it: padding must not be masked
    (hi, ht), (oi, ot) = hf_features(hf, pixels, ids), ours_features(model, pixels, ids)
    assert max_diff(hi, oi) <= 1e-4 and max_diff(ht, ot) <= 1e-4
    out = model(texts=ids)
    assert out["logit_scale"].item() == pytest.approx(torch.tensor(1.7).exp().item(), rel=1e-6)
    assert out["logit_bias"].item() == pytest.approx(-3.5)
    with pytest.raises(FileNotFoundError, match="SentencePiece"):
        tokenizer(["a photo"])  # no tokenizer files were saved: a clear error, not a wrong tokenizer


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_export_hf_round_trip(tmp_path, family):
    hf = clip_model(CLIP_CASES[1]) if family == "clip" else siglip_model(SIGLIP_CASES[0])
    hf.save_pretrained(tmp_path / "src")
    model, _, _ = clipforge.load(str(tmp_path / "src"))
    export_hf(model, tmp_path / "out")
    back = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    size = model.cfg.vision.image_size
    pixels, ids = torch.randn(2, 3, size, size), text_ids()
    for a, b in zip(hf_features(hf, pixels, ids), hf_features(back, pixels, ids)):
        assert max_diff(a, b) <= 1e-6
    ref = hf.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_export_hf_from_clipforge_model_with_tokenizer(tmp_path):
    model = clipforge.create_model("tiny", seed=0).eval()
    export_hf(model, tmp_path)
    hf = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    texts = ["a red circle", "two blue squares left of a green triangle"]
    hf_tok = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    hf_ids = hf_tok(texts, padding="max_length", max_length=32, return_tensors="pt")["input_ids"]
    ids = clipforge.tokenize(texts, context_length=32)
    pixels = torch.randn(2, 3, 64, 64)
    hi, ht = hf_features(hf, pixels, hf_ids)
    oi, ot = ours_features(model, pixels, ids)
    assert max_diff(hi, oi) <= 1e-4 and max_diff(ht, ot) <= 1e-4
