"""Checkpoints from untrusted places: TorchScript archives, corrupt files, non-finite weights.

A TorchScript archive carries code that ``torch.jit.load`` compiles and runs (its modules'
``__setstate__``). The hostile archive here writes a marker file when it is loaded, through
``torch.from_file(..., shared=True)``, which creates the file. Every way clipforge reads a
model must leave the marker absent unless the caller opts in with ``trust_pickle``.
"""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torchscript_archive import scripted_state

import clipforge
from clipforge.cli.main import main
from clipforge.interop import read_state_dict
from clipforge.interop.keymap import export_state
from clipforge.interop.openclip_layout import openclip_rules
from clipforge.models import save_model

SMALL = {"embed_dim": 16, "vision": {"image_size": 16, "patch_size": 8, "width": 64, "layers": 1, "heads": 1},
         "text": {"context_length": 8, "width": 64, "layers": 1, "heads": 1}}


class Payload(nn.Module):
    """What a hostile archive can do: its ``__setstate__`` runs at ``torch.jit.load`` and creates a file."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.probe = torch.zeros(1, dtype=torch.uint8)
        self.weight = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.marker = state[0]
        self.weight = state[1]
        self.training = state[2]
        self.probe = torch.from_file(self.marker, shared=True, size=1, dtype=torch.uint8)


@pytest.fixture(scope="module")
def small():
    return clipforge.create_model("tiny", seed=0, **SMALL).eval()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, small):
    """(archive with OpenCLIP/OpenAI-layout weights plus the payload, marker path), marker not yet created."""
    d = tmp_path_factory.mktemp("hostile")
    marker = d / "MARKER"
    sd = export_state(openclip_rules(small.cfg), small.state_dict())
    scripted_state(sd, Payload(str(marker))).save(str(d / "ViT-evil.pt"))
    assert not marker.exists()
    return d / "ViT-evil.pt", marker


@pytest.fixture
def places(hostile, tmp_path):
    """The archive as a bare file, as pytorch_model.bin of an HF directory, as an OpenCLIP directory's weights."""
    archive, marker = hostile
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (hf / "pytorch_model.bin").write_bytes(archive.read_bytes())
    oc = tmp_path / "oc"
    oc.mkdir()
    (oc / "open_clip_pytorch_model.bin").write_bytes(archive.read_bytes())
    return {"file": archive, "hf": hf, "openclip": oc}, marker


def test_payload_runs_when_trusted(hostile, tmp_path):
    """The archive really is hostile: loading it with the opt-in creates the marker (so the tests below can fail)."""
    archive, _ = hostile
    marker = tmp_path / "TRUSTED_MARKER"
    scripted_state({"w": torch.ones(1)}, Payload(str(marker))).save(str(tmp_path / "p.pt"))
    read_state_dict(tmp_path / "p.pt", trust_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize("where", ["file", "hf", "openclip"])
def test_torchscript_is_refused_without_opt_in(places, where):
    sources, marker = places
    with pytest.raises(ValueError) as e:
        clipforge.load(sources[where])
    msg = str(e.value)
    assert "TorchScript" in msg and "runs" in msg and "trust_pickle=True" in msg and "--trust-pickle" in msg
    assert not marker.exists()
    with pytest.raises(ValueError, match="TorchScript"):
        read_state_dict(sources["file"])
    assert not marker.exists()


def _image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir(exist_ok=True)
    Image.new("RGB", (20, 20), (200, 10, 10)).save(d / "a.png")
    return d


def _commands(source: Path, tmp_path: Path) -> dict[str, list[str]]:
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\na blue square\n")
    return {
        "eval": ["eval", str(source), "--size", "8", "--no-cache", "--no-report", "--out", str(tmp_path / "ev")],
        "embed": ["embed", str(source), "--texts", "a red circle", "--out", str(tmp_path / "e.npy")],
        "export": ["export", str(source), "--to", "clipforge", "--out", str(tmp_path / "x")],
        "index": [
            "index",
            str(source),
            "--images",
            str(_image_dir(tmp_path)),
            "--out",
            str(tmp_path / "idx"),
            "--quiet",
        ],
        "adapt": ["adapt", str(source), "--shots", "1", "--size", "8", "--quiet"],
        "pivot": ["pivot", str(source), "--text-file", str(texts), "--out", str(tmp_path / "pv"), "--steps", "1"],
        "train init_from": [
            "train",
            "--no-eval",
            f"out_dir={tmp_path / 'run'}",
            f"init_from={source}",
            "steps=1",
            "progress=false",
        ],
        "train init_vision_from": [
            "train",
            "--no-eval",
            f"out_dir={tmp_path / 'run2'}",
            f"init_vision_from={source}",
            "steps=1",
            "progress=false",
        ],
    }


@pytest.mark.parametrize("where", ["file", "hf", "openclip"])
def test_no_command_runs_the_archive(places, tmp_path, capsys, where):
    sources, marker = places
    for name, argv in _commands(sources[where], tmp_path).items():
        code = main(argv)
        err = capsys.readouterr().err
        assert not marker.exists(), name
        assert code == 2, (name, err)
        assert "TorchScript" in err and "--trust-pickle" in err, (name, err)


def test_every_loading_command_offers_the_opt_ins(capsys):
    for cmd in ("eval", "embed", "export", "index", "adapt", "pivot", "serve", "caption"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        for flag in ("--trust-pickle", "--model-name", "--allow-nonfinite"):
            assert flag in out, (cmd, flag)
    from clipforge.train import TrainConfig

    for key in ("init_trust_pickle", "init_model_name", "init_vision_model_name", "init_allow_nonfinite"):
        assert hasattr(TrainConfig(), key), key


def test_genuine_openai_archive_loads_with_opt_in(small, tmp_path):
    """An OpenAI-style TorchScript archive (OpenCLIP layout + metadata entries) gives back the same model."""
    sd = export_state(openclip_rules(small.cfg), small.state_dict())
    sd["input_resolution"] = torch.tensor(16)
    sd["context_length"] = torch.tensor(8)
    sd["vocab_size"] = torch.tensor(49408)
    scripted_state(sd).save(str(tmp_path / "ViT-small.pt"))
    model, tokenizer, _ = clipforge.load(tmp_path / "ViT-small.pt", trust_pickle=True)
    assert model.cfg.vision.act == "quick_gelu"
    # the weights are the small model's; only the activation differs, so compare with that model made quick_gelu
    ref_cfg = json.loads(json.dumps(SMALL))
    ref_cfg["vision"]["act"] = ref_cfg["text"]["act"] = "quick_gelu"
    ref = clipforge.create_model("tiny", **ref_cfg).eval()
    ref.load_state_dict(small.state_dict())
    ids, pixels = tokenizer(["a red circle", "two squares"]), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), ref.encode_image(pixels), atol=1e-6)
        assert torch.allclose(model.encode_text(ids), ref.encode_text(ids), atol=1e-6)
    main_code = main(["export", str(tmp_path / "ViT-small.pt"), "--trust-pickle", "--to", "clipforge",
                      "--out", str(tmp_path / "conv")])
    assert main_code == 0 and (tmp_path / "conv" / "model.safetensors").exists()


# -- corrupt files -----------------------------------------------------------------------------------------------


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_safetensors_names_the_file(small, tmp_path):
    save_model(small, tmp_path / "m")
    _truncate(tmp_path / "m" / "model.safetensors")
    for call in (lambda: clipforge.load(tmp_path / "m"), lambda: clipforge.load_model(tmp_path / "m")):
        with pytest.raises(ValueError) as e:
            call()
        assert str(tmp_path / "m" / "model.safetensors") in str(e.value) and "corrupt" in str(e.value)
    sd = export_state(openclip_rules(small.cfg), small.state_dict())
    save_file(sd, str(tmp_path / "oc.safetensors"))
    _truncate(tmp_path / "oc.safetensors", 0.3)
    with pytest.raises(ValueError, match="oc.safetensors.*corrupt"):
        clipforge.load(tmp_path / "oc.safetensors", model_name="ViT-B-32")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        read_state_dict(tmp_path / "garbage.safetensors")


@pytest.mark.parametrize("trust", [False, True])
def test_truncated_pickle_names_the_file(small, tmp_path, trust):
    torch.save(small.state_dict(), tmp_path / "w.pt")
    _truncate(tmp_path / "w.pt")
    with pytest.raises(ValueError) as e:
        read_state_dict(tmp_path / "w.pt", trust_pickle=trust)
    assert str(tmp_path / "w.pt") in str(e.value) and "corrupt" in str(e.value)
    assert "trust_pickle" not in str(e.value)  # a damaged file is not one to unpickle with more trust


def test_cli_reports_a_corrupt_file_in_one_line(small, tmp_path, capsys):
    save_model(small, tmp_path / "m")
    _truncate(tmp_path / "m" / "model.safetensors")
    assert main(["embed", str(tmp_path / "m"), "--texts", "x", "--out", str(tmp_path / "e.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0]


# -- non-finite weights ------------------------------------------------------------------------------------------


@pytest.fixture
def nan_model_dir(small, tmp_path):
    bad = clipforge.create_model("tiny", seed=0, **SMALL).eval()
    with torch.no_grad():
        bad.visual.proj[0, 0] = float("nan")
        bad.text.ln_final.weight[3] = float("inf")
    return save_model(bad, tmp_path / "nan")


def test_nonfinite_weights_are_refused(nan_model_dir):
    for call in (lambda **k: clipforge.load(nan_model_dir, **k), lambda **k: clipforge.load_model(nan_model_dir, **k)):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "non-finite" in msg and "visual.proj" in msg and "text.ln_final.weight" in msg
        assert "allow_nonfinite=True" in msg and "--allow-nonfinite" in msg


def test_nonfinite_weights_load_with_a_loud_warning_when_allowed(nan_model_dir, caplog):
    with caplog.at_level("WARNING"):
        model = clipforge.load_model(nan_model_dir, allow_nonfinite=True)
    assert torch.isnan(model.visual.proj[0, 0])
    assert any("non-finite" in r.getMessage().lower() and r.levelname == "WARNING" for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        model, _, _ = clipforge.load(nan_model_dir, allow_nonfinite=True)
    assert any("non-finite" in r.getMessage().lower() for r in caplog.records)


def test_nonfinite_openclip_file_is_refused(tmp_path):
    bad = clipforge.create_model("tiny", seed=0, **SMALL).eval()
    with torch.no_grad():
        bad.text.token_embedding.weight[5, 0] = float("nan")
    save_file(export_state(openclip_rules(bad.cfg), bad.state_dict()), str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match="non-finite.*token_embedding"):
        clipforge.load(tmp_path / "nan.safetensors", openai=True)


def test_cli_refuses_nonfinite_and_allows_with_flag(nan_model_dir, tmp_path, capsys):
    out = tmp_path / "e.npy"
    assert main(["embed", str(nan_model_dir), "--texts", "x", "--out", str(out)]) == 2
    assert "--allow-nonfinite" in capsys.readouterr().err and not out.exists()
    assert main(["embed", str(nan_model_dir), "--texts", "x", "--out", str(out), "--allow-nonfinite"]) == 0
    assert out.exists()

