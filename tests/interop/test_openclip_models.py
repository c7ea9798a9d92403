"""The shipped OpenCLIP model-name table and how clipforge.load decides what an OpenCLIP-layout file is.

References: OpenCLIP's own ``model_configs/*.json`` (the anchor venv) for the table; for the
decisions, files whose right reading is known by construction (a small model written in the
OpenCLIP layout, OpenAI's metadata entries, open_clip_train's run names).
"""
import json
import subprocess
from pathlib import Path

import pytest
import torch
from openclip_anchor import openclip_python
from safetensors.torch import save_file

import clipforge
from clipforge.interop import openclip_models
from clipforge.interop.keymap import export_state
from clipforge.interop.load import Checkpoint, resolve_openclip
from clipforge.interop.openclip_layout import openclip_rules

SMALL = {"embed_dim": 16, "vision": {"image_size": 16, "patch_size": 8, "width": 64, "layers": 1, "heads": 1},
         "text": {"context_length": 8, "width": 64, "layers": 1, "heads": 1}}


def test_table_matches_openclips_own_configs():
    python = openclip_python()
    code = ("import json, pathlib, open_clip; d = pathlib.Path(open_clip.__file__).parent / 'model_configs'; "
            "print(json.dumps({'version': open_clip.__version__, "
            "'configs': {p.stem: json.loads(p.read_text()) for p in sorted(d.glob('*.json'))}}))")
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = json.loads(r.stdout)
    table = openclip_models.table()
    assert theirs["version"] in table["source"]
    assert set(table["models"]) == set(theirs["configs"])
    for name, cfg in theirs["configs"].items():
        entry = table["models"][name]
        assert entry.get("model_cfg", cfg) == cfg, name  # supported entries are OpenCLIP's config, unchanged


@pytest.mark.parametrize("name,quick,t_heads,v_head_width", [
    ("ViT-B-32", False, 8, 64), ("ViT-B-32-quickgelu", True, 8, 64), ("ViT-B-16", False, 8, 64),
    ("ViT-B-16-quickgelu", True, 8, 64), ("ViT-L-14", False, 12, 64), ("ViT-L-14-quickgelu", True, 12, 64),
    ("ViT-H-14", False, 16, 80), ("ViT-bigG-14", False, 20, 104)])
def test_named_models_carry_what_weights_cannot_show(name, quick, t_heads, v_head_width):
    """Values from OpenCLIP 3.3.0's model_configs/NAME.json, read by hand."""
    cfg = openclip_models.model_config(name)
    assert bool(cfg.get("quick_gelu")) is quick
    assert cfg["text_cfg"]["heads"] == t_heads and cfg["vision_cfg"].get("head_width", 64) == v_head_width


@pytest.mark.parametrize("name,why", [("RN50", "ModifiedResNet"), ("RN50-quickgelu", "ModifiedResNet"),
                                      ("ViT-B-16-SigLIP", "timm_model_name"), ("ViT-SO400M-14-SigLIP", "timm"),
                                      ("coca_ViT-B-32", "multimodal_cfg"), ("ViT-H-14-CLIPA", "no_ln_pre")])
def test_unsupported_names_say_why(name, why):
    with pytest.raises(ValueError, match=f"'{name}' is not supported by clipforge.*{why}"):
        openclip_models.model_config(name)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="not an OpenCLIP model name.*ViT-B-32"):
        openclip_models.model_config("ViT-B-33")


@pytest.fixture(scope="module")
def small_state():
    model = clipforge.create_model("tiny", seed=0, **SMALL).eval()
    return model, export_state(openclip_rules(model.cfg), model.state_dict())


def test_state_dict_without_config_is_refused_not_guessed(small_state, tmp_path):
    """Issue 22: such a file used to load silently as QuickGELU (OpenAI's reading)."""
    _, sd = small_state
    save_file(sd, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError) as e:
        clipforge.load(tmp_path / "weights.safetensors")
    msg = str(e.value)
    for part in ("weights.safetensors", "QuickGELU", "model_name=", "--model-name", "openai=True", "model_config="):
        assert part in msg, part
    model, _, _ = clipforge.load(tmp_path / "weights.safetensors", openai=True)
    assert model.cfg.vision.act == model.cfg.text.act == "quick_gelu"
    with pytest.raises(ValueError, match="openai=False"):
        clipforge.load(tmp_path / "weights.safetensors", openai=False)


def test_openai_metadata_means_openai(small_state, tmp_path):
    ref, sd = small_state
    torch.save({**sd, "input_resolution": torch.tensor(16), "context_length": torch.tensor(8),
                "vocab_size": torch.tensor(49408)}, tmp_path / "ViT-x.pt")
    model, _, _ = clipforge.load(tmp_path / "ViT-x.pt")
    assert model.cfg.vision.act == model.cfg.text.act == "quick_gelu"
    assert model.cfg.vision.heads == 1 and model.cfg.text.heads == 1  # 64-channel heads
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_conflicting_choices_are_refused(small_state, tmp_path):
    _, sd = small_state
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="give one of"):
        clipforge.load(tmp_path / "w.safetensors", model_name="ViT-B-32", openai=True)
    with pytest.raises(ValueError, match="embed_dim: 512 in the config, 16 in the weights"):
        clipforge.load(tmp_path / "w.safetensors", model_name="ViT-B-32")


@pytest.mark.parametrize("run_name,model", [
    ("2024_05_01-10_20_30-model_ViT-B-32-lr_0.0005-b_256-j_8-p_amp", "ViT-B-32"),
    ("2024_05_01-10_20_30-model_ViT-L-14-quickgelu-lr_5e-05-b_128-j_4-p_amp_bf16", "ViT-L-14-quickgelu"),
    ("2024_05_01-10_20_30-model_hf-hub:timm-ViT-B-16-SigLIP-lr_1e-3-b_32-j_2-p_fp32", None)])
def test_training_checkpoint_run_name(run_name, model, tmp_path):
    """open_clip_train's default --name: DATE-TIME-model_NAME-lr_LR-b_BATCH-j_WORKERS-p_PRECISION."""
    ckpt = Checkpoint({}, training_checkpoint=True, run_name=run_name)
    if model is None:  # a name the table does not know is refused with the table's message
        with pytest.raises(ValueError, match="not an OpenCLIP model name"):
            resolve_openclip(tmp_path / "epoch_1.pt", ckpt, None, None, None)
        return
    cfg, is_openai, what = resolve_openclip(tmp_path / "epoch_1.pt", ckpt, None, None, None)
    assert not is_openai and model in what and cfg == openclip_models.model_config(model)


def test_training_checkpoint_with_a_custom_run_name_is_refused(tmp_path):
    ckpt = Checkpoint({}, training_checkpoint=True, run_name="my-experiment")
    with pytest.raises(ValueError, match="does not name its model.*model_name="):
        resolve_openclip(tmp_path / "epoch_3.pt", ckpt, None, None, None)
    run = tmp_path / "my-experiment"
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.txt").write_text("batch_size: 256\nforce_quick_gelu: False\nmodel: ViT-B-16\nname: my-experiment\n")
    cfg, _, what = resolve_openclip(run / "checkpoints" / "epoch_3.pt", ckpt, None, None, None)
    assert cfg == openclip_models.model_config("ViT-B-16") and "params.txt" in what


def test_table_ships_as_package_data():
    assert Path(openclip_models.TABLE).exists()
    text = Path(__file__).resolve().parents[2].joinpath("pyproject.toml").read_text()
    assert '"interop/*.json"' in text


def test_hub_directory_with_timms_config_json_reads_the_openclip_files(small_state, tmp_path):
    """timm's hub repositories carry a config.json without model_type beside OpenCLIP's files."""
    ref, sd = small_state
    save_file(sd, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch32_clip_224", "num_classes": 512}))
    model_cfg = {"embed_dim": 16, "quick_gelu": True,
                 "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 64, "layers": 1, "head_width": 64},
                 "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    model, _, _ = clipforge.load(tmp_path)
    assert model.cfg.vision.act == "quick_gelu"
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
