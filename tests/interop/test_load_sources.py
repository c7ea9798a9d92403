"""clipforge.load: clipforge checkpoints, hf-hub offline behaviour, safety and bad input."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import clipforge
from clipforge.interop import export_hf, read_state_dict
from clipforge.interop.keymap import export_state
from clipforge.interop.openclip_layout import openclip_rules
from clipforge.models import save_model


@pytest.fixture(scope="module")
def tiny():
    return clipforge.create_model("tiny", seed=0).eval()


@pytest.fixture
def openclip_file(tiny, tmp_path):
    """The tiny model written in the OpenCLIP layout (export_state of the import rules)."""
    sd = export_state(openclip_rules(tiny.cfg), tiny.state_dict())
    save_file(sd, str(tmp_path / "oc.safetensors"))
    cfg = {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
    }
    (tmp_path / "oc.json").write_text(json.dumps(cfg))
    return tmp_path / "oc.safetensors"


def test_clipforge_directory(tiny, tmp_path):
    save_model(tiny, tmp_path)
    model, tokenizer, preprocess = clipforge.load(tmp_path)
    ids = tokenizer(["a red circle"])
    assert ids.shape == (1, 32)
    assert torch.allclose(model.encode_text(ids), tiny.encode_text(ids))
    assert preprocess(Image.new("RGB", (80, 50))).shape == (3, 64, 64)


def test_openclip_layout_round_trip_is_exact(tiny, openclip_file):
    model, tokenizer, _ = clipforge.load(openclip_file)
    for k, v in tiny.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.cfg.vision.heads == 4 and model.cfg.vision.act == "gelu"


def test_tokenizer_matches_transformers(tmp_path, tiny):
    transformers = pytest.importorskip("transformers")
    export_hf(tiny, tmp_path)
    _, tokenizer, _ = clipforge.load(tmp_path)
    texts = ["A photo of a CAT!", "two blue squares, left of a green triangle", "naïve café, 3 dogs", ""]
    ref = transformers.CLIPTokenizer.from_pretrained(tmp_path)(texts, padding="max_length", max_length=32,
                                                               truncation=True, return_tensors="pt")["input_ids"]
    ours = tokenizer(texts)
    # HF pads with <|endoftext|>, clipforge with 0: compare up to and including the first end-of-text token
    for r, o in zip(ref, ours):
        n = int((r == 49407).nonzero()[0]) + 1
        assert torch.equal(r[:n], o[:n])


@pytest.mark.parametrize("size,mode", [((300, 200), "RGB"), ((64, 97), "RGBA"), ((50, 50), "L"), ((123, 321), "P")])
def test_preprocess_matches_clip_image_processor(tmp_path, tiny, size, mode):
    transformers = pytest.importorskip("transformers")
    export_hf(tiny, tmp_path)
    _, _, preprocess = clipforge.load(tmp_path)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: size[1], : size[0]]
    arr = np.stack([xx * 255 // size[0], yy * 255 // size[1], rng.integers(0, 255, (size[1], size[0]))], -1).astype(
        np.uint8
    )
    img = Image.fromarray(arr).convert(mode)
    ref = transformers.CLIPImageProcessor.from_pretrained(tmp_path)(img.convert("RGB"), return_tensors="pt")[
        "pixel_values"
    ][0]
    assert (preprocess(img) - ref).abs().max().item() <= 1e-3


def test_hf_hub_offline_fails_fast_without_cache_writes(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    code = "import clipforge; clipforge.load('hf-hub:someorg/some-clip-model')"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and time.time() - t0 < 30
    assert "someorg/some-clip-model" in r.stderr and "local" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    written = [p for p in (tmp_path / "hf").rglob("*") if p.is_file()] if (tmp_path / "hf").exists() else []
    assert not any("some-clip-model" in str(p) for p in written)


def test_hf_hub_no_network_probe_is_bounded(monkeypatch, tmp_path):
    from clipforge.interop import hub

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_reachable", lambda host, timeout: False)
    with pytest.raises(ConnectionError, match="cannot be reached"):
        clipforge.load("hf-hub:someorg/other-model")


def test_pickle_needs_opt_in(tmp_path, tiny):
    import argparse

    # an arbitrary Python object inside the pickle (as OpenCLIP training checkpoints hold their args)
    torch.save({"state_dict": tiny.state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="trust_pickle=True"):
        read_state_dict(tmp_path / "ckpt.pt")
    assert set(read_state_dict(tmp_path / "ckpt.pt", trust_pickle=True)) == set(tiny.state_dict())


def test_missing_and_unexpected_keys_are_named(openclip_file, tmp_path):
    sd = load_file(str(openclip_file))
    del sd["visual.ln_post.weight"]
    sd["visual.extra_thing"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError) as e:
        clipforge.load(tmp_path / "bad.safetensors", model_config=openclip_file.with_suffix(".json"))
    assert "visual.ln_post.weight" in str(e.value) and "visual.extra_thing" in str(e.value)


def test_shape_mismatch_names_tensor(tiny, tmp_path):
    sd = {k: v.clone() for k, v in tiny.state_dict().items()}
    sd["visual.ln_post.bias"] = torch.zeros(5)
    save_model(tiny, tmp_path)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="visual.ln_post.bias"):
        clipforge.load(tmp_path)


def test_unknown_format_lists_known_ones(tmp_path):
    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="hf-clip.*openclip.*openai.*clipforge.*hf-hub"):
        clipforge.load(tmp_path / "weights.onnx")
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "foo.safetensors"))
    with pytest.raises(ValueError, match="no known layout"):
        clipforge.load(tmp_path / "foo.safetensors")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type 'bert'"):
        clipforge.load(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clipforge.load(tmp_path / "nothing-here")


def test_a_model_name_given_to_load_points_to_create_model(tmp_path, monkeypatch):
    """``clipforge.load('ViT-B-32')`` (an OpenCLIP habit: a name loads pretrained weights) says that a name is an
    architecture and how to build it; the name it suggests does build."""
    monkeypatch.chdir(tmp_path)  # no file called ViT-B-32 here
    with pytest.raises(FileNotFoundError) as err:
        clipforge.load("ViT-B-32")
    msg = str(err.value)
    assert "'ViT-B-32' does not exist" in msg and "clipforge.create_model(NAME)" in msg and "hf-hub:ORG/NAME" in msg
    assert "ViT-B-32" in clipforge.list_models() and "tiny" in clipforge.list_models()
