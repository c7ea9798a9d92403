"""clipforge.load on OpenCLIP / OpenAI checkpoints: parity with OpenCLIP itself.

OpenCLIP cannot be imported in the main venv, so random OpenCLIP models are built, saved
and run by the anchor venv's python in a subprocess; its embeddings are compared with
clipforge's on the same inputs (max abs <= 1e-4, fp32). The anchor is found by tests/openclip_anchor.py
(skipped where it is absent, failed under CI=true).
An OpenAI-style TorchScript archive is built here from the same weights.
"""
import json
import subprocess
import textwrap

import pytest
import torch
from openclip_anchor import openclip_python
from safetensors.torch import load_file
from torchscript_archive import scripted_state

import clipforge

CASES = {
    "gelu-p8": dict(
        embed_dim=24,
        quick_gelu=False,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=12, vocab_size=99, width=32, heads=4, layers=2),
    ),
    "quickgelu-p16": dict(
        embed_dim=40,
        quick_gelu=True,
        vision_cfg=dict(image_size=48, patch_size=16, width=64, layers=1, head_width=32, mlp_ratio=2.0),
        text_cfg=dict(context_length=10, vocab_size=99, width=48, heads=3, layers=3),
    ),
}

SCRIPT = textwrap.dedent("""
    import json, sys, torch, open_clip
    from safetensors.torch import save_file
    out = sys.argv[1]
    cases = json.loads(sys.argv[2])
    for name, cfg in cases.items():
        torch.manual_seed(0)
        m = open_clip.CLIP(**cfg).eval()
        with torch.no_grad():
            m.logit_scale.fill_(2.5)
            for p in m.parameters():  # OpenCLIP zero-inits some tensors; perturb all so every rename is tested
                p.add_(0.02 * torch.randn_like(p))
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        g = torch.Generator().manual_seed(1)
        pixels = torch.randn(3, 3, v["image_size"], v["image_size"], generator=g)
        ids = torch.zeros(3, t["context_length"], dtype=torch.long)
        for i in range(3):
            k = 2 + i
            ids[i, :k] = torch.randint(1, t["vocab_size"] - 2, (k,), generator=g)
            ids[i, k] = t["vocab_size"] - 1
        with torch.no_grad():
            img, txt = m.encode_image(pixels, normalize=True), m.encode_text(ids, normalize=True)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{out}/{name}.safetensors")
        json.dump(cfg, open(f"{out}/{name}.json", "w"))
        save_file({"pixels": pixels, "ids": ids, "img": img, "txt": txt}, f"{out}/{name}.io.safetensors")
""")


@pytest.fixture(scope="module")
def anchor_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("openclip")
    subprocess.run([str(openclip_python()), "-c", SCRIPT, str(out), json.dumps(CASES)], check=True, timeout=120,
                   capture_output=True)
    return out


def check(model, io):
    with torch.no_grad():
        img, txt = model.encode_image(io["pixels"]), model.encode_text(io["ids"])
    assert (img - io["img"]).abs().max().item() <= 1e-4
    assert (txt - io["txt"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(CASES))
def test_openclip_state_dict_with_config(anchor_dir, name):
    io = load_file(str(anchor_dir / f"{name}.io.safetensors"))
    # the config JSON beside the weights (<stem>.json) is found automatically
    model, tokenizer, preprocess = clipforge.load(anchor_dir / f"{name}.safetensors")
    cfg = CASES[name]
    assert model.cfg.vision.act == ("quick_gelu" if cfg["quick_gelu"] else "gelu")
    assert model.cfg.vision.heads == cfg["vision_cfg"]["width"] // cfg["vision_cfg"]["head_width"]
    assert model.cfg.text.heads == cfg["text_cfg"]["heads"]
    anchor_scale = load_file(str(anchor_dir / f"{name}.safetensors"))["logit_scale"].exp().item()
    assert model.scale().item() == pytest.approx(anchor_scale, rel=1e-6)
    check(model, io)


def test_openclip_pickle_weights_only(anchor_dir, tmp_path):
    sd = load_file(str(anchor_dir / "gelu-p8.safetensors"))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "epoch_3.pt")
    model, _, _ = clipforge.load(tmp_path / "epoch_3.pt", model_config=anchor_dir / "gelu-p8.json")
    check(model, load_file(str(anchor_dir / "gelu-p8.io.safetensors")))


def test_openai_torchscript_archive(anchor_dir, tmp_path):
    """OpenAI checkpoints: no config, quick_gelu and 64-wide heads are implied; the JIT archive is read too."""
    sd = load_file(str(anchor_dir / "quickgelu-p16.safetensors"))
    sd["input_resolution"] = torch.tensor(48)  # metadata OpenAI's archives carry
    scripted_state(sd).save(str(tmp_path / "ViT-tiny.pt"))
    model, tokenizer, _ = clipforge.load(tmp_path / "ViT-tiny.pt", trust_pickle=True)  # TorchScript runs code
    assert model.cfg.vision.act == "quick_gelu" and model.cfg.text.act == "quick_gelu"
    assert model.cfg.vision.heads == 1 and model.cfg.text.heads == 1  # OpenAI's rule: width // 64 (at least 1)
    assert model.cfg.vision.image_size == 48 and model.cfg.embed_dim == 40 and model.cfg.vision.mlp_ratio == 2.0
    # heads are not in the weights and the anchor used 2 and 3, so parity needs the model config:
    # with it, the archive matches OpenCLIP exactly.
    model, _, _ = clipforge.load(tmp_path / "ViT-tiny.pt", model_config=anchor_dir / "quickgelu-p16.json",
                                 trust_pickle=True)
    check(model, load_file(str(anchor_dir / "quickgelu-p16.io.safetensors")))
