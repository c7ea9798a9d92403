"""clipforge.load on the files OpenCLIP itself writes for its named models, against OpenCLIP's own embeddings.

OpenCLIP 3.3 (its own venv, found by tests/openclip_anchor.py) creates randomly initialised
ViT-B-32, ViT-B-32-quickgelu, ViT-B-16 and ViT-L-14 models, writes them the ways people hold
them, and embeds a fixed batch (2 images, 3 captions) with ``encode_image/encode_text(normalize=True)``:

- a bare state dict (``torch.save(model.state_dict())``, ``.bin``) and a ``.safetensors``, no config;
- an hf-hub-style directory: ``open_clip_config.json`` (OpenCLIP's ``save_config_for_hf``) and
  ``open_clip_model.safetensors``;
- training checkpoints as ``open_clip_train`` writes them (``{"epoch", "name", "state_dict":
  {"module.<key>"}, "optimizer"}``): one with the default run name (which names the model), one
  under ``logs/RUN/checkpoints/`` beside the run's ``params.txt`` (a ViT-B-32 run with
  ``--force-quick-gelu``, which only params.txt records).

clipforge must refuse the files that do not say which model they are, load the others (with
``model_name=`` where needed) and match OpenCLIP's embeddings to 1e-5; its tokenizer must give
OpenCLIP's ids.
"""
import json
import shutil
import subprocess
import textwrap

import pytest
import torch
from openclip_anchor import openclip_python
from safetensors.torch import load_file

import clipforge

# tag -> (OpenCLIP model name, create_model keywords, formats written)
# (train_params: a ViT-B-32 run with --force-quick-gelu is the ViT-B-32-quickgelu model, so it is written from that)
JOBS = {
    "ViT-B-32": ("ViT-B-32", {}, ["bin", "safetensors", "train_name"]),
    "ViT-B-32-quickgelu": ("ViT-B-32", {"force_quick_gelu": True}, ["bin", "hub", "train_params"]),
    "ViT-B-16": ("ViT-B-16", {}, ["hub"]),
    "ViT-L-14": ("ViT-L-14", {}, ["hub"]),
}
TEXTS = ["a photo of a cat", "two dogs playing in the snow", "a diagram of a CLIP model, 2021!"]
RUN_NAME = "2026_12_03-07_45_00-model_{model}-lr_0.0005-b_256-j_4-p_amp"  # open_clip_train's default --name

SCRIPT = textwrap.dedent("""
    import json, sys, torch, open_clip
    from pathlib import Path
    from safetensors.torch import save_file
    from open_clip.push_to_hf_hub import save_config_for_hf
    out, jobs, texts, run_name = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(2)
    for tag, (name, kwargs, formats) in jobs.items():
        torch.manual_seed(0)
        model = open_clip.create_model(name, **kwargs).eval()
        sd = model.state_dict()
        g = torch.Generator().manual_seed(1)
        pixels = torch.randn(2, 3, 224, 224, generator=g)
        ids = open_clip.get_tokenizer(name)(texts)
        with torch.no_grad():
            img, txt = model.encode_image(pixels, normalize=True), model.encode_text(ids, normalize=True)
        save_file({"pixels": pixels, "ids": ids, "img": img, "txt": txt}, str(out / f"{tag}.io.safetensors"))
        for fmt in formats:
            if fmt == "bin":
                torch.save(sd, out / f"{tag}.bin")
            elif fmt == "safetensors":
                save_file({k: v.contiguous() for k, v in sd.items()}, str(out / f"{tag}.safetensors"))
            elif fmt == "hub":
                d = out / f"{tag}-hub"
                d.mkdir()
                save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "open_clip_model.safetensors"))
                cfg = open_clip.get_model_config(name + ("-quickgelu" if kwargs.get("force_quick_gelu") else ""))
                save_config_for_hf(model, d / "open_clip_config.json", cfg)
            else:
                args = {"model": name, "force_quick_gelu": bool(kwargs.get("force_quick_gelu")), "lr": 0.0005,
                        "name": run_name.format(model=name) if fmt == "train_name" else f"my-run-{tag}"}
                ckpt = {"epoch": 1, "name": args["name"], "state_dict": {f"module.{k}": v for k, v in sd.items()},
                        "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005, "params": [0, 1]}]}}
                d = out / f"{tag}-{fmt}" / args["name"]
                (d / "checkpoints").mkdir(parents=True)
                torch.save(ckpt, d / "checkpoints" / "epoch_1.pt")
                if fmt == "train_params":  # open_clip_train's params.txt: "name: value" lines, sorted
                    (d / "params.txt").write_text("".join(f"{k}: {args[k]}\\n" for k in sorted(args)))
""")


@pytest.fixture(scope="module")
def anchor(tmp_path_factory):
    python = openclip_python()
    out = tmp_path_factory.mktemp("openclip-models")
    r = subprocess.run([str(python), "-c", SCRIPT, str(out), json.dumps(JOBS), json.dumps(TEXTS), RUN_NAME],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    yield out
    shutil.rmtree(out, ignore_errors=True)  # 5.7 GB of checkpoints: not kept for the rest of the session


def check(model, tokenizer, io, tol=1e-5):
    assert torch.equal(tokenizer(TEXTS).to(io["ids"].dtype), io["ids"])
    with torch.no_grad():
        img, txt = model.encode_image(io["pixels"]), model.encode_text(io["ids"])
    assert (img - io["img"]).abs().max().item() <= tol
    assert (txt - io["txt"]).abs().max().item() <= tol


def io_of(anchor, tag):
    return load_file(str(anchor / f"{tag}.io.safetensors"))


@pytest.mark.parametrize("tag", ["ViT-B-32", "ViT-B-32-quickgelu"])
def test_bare_state_dict_needs_a_model_name_then_matches(anchor, tag):
    path = anchor / f"{tag}.bin"
    with pytest.raises(ValueError) as e:  # the weights are the same for GELU and QuickGELU: never guess
        clipforge.load(path)
    assert "model_name=" in str(e.value) and "openai=True" in str(e.value)
    model, tokenizer, _ = clipforge.load(path, model_name=tag)
    assert model.cfg.text.act == ("quick_gelu" if tag.endswith("quickgelu") else "gelu")
    check(model, tokenizer, io_of(anchor, tag))


def test_safetensors_with_model_name(anchor):
    model, tokenizer, _ = clipforge.load(anchor / "ViT-B-32.safetensors", model_name="ViT-B-32")
    check(model, tokenizer, io_of(anchor, "ViT-B-32"))
    # a name whose architecture the weights contradict is refused, naming what differs
    with pytest.raises(ValueError, match="patch_size: 16 in the config, 32 in the weights"):
        clipforge.load(anchor / "ViT-B-32.safetensors", model_name="ViT-B-16")


@pytest.mark.parametrize("tag", ["ViT-B-32-quickgelu", "ViT-B-16", "ViT-L-14"])
def test_hf_hub_directory(anchor, tag):
    model, tokenizer, _ = clipforge.load(anchor / f"{tag}-hub")
    check(model, tokenizer, io_of(anchor, tag))


def test_training_checkpoint_named_by_its_run(anchor, caplog):
    ckpt = anchor / "ViT-B-32-train_name" / RUN_NAME.format(model="ViT-B-32") / "checkpoints" / "epoch_1.pt"
    with caplog.at_level("WARNING"):
        model, tokenizer, _ = clipforge.load(ckpt)
    assert any("force-quick-gelu" in r.getMessage() for r in caplog.records)  # what the run name cannot tell
    assert model.cfg.vision.act == "gelu"
    check(model, tokenizer, io_of(anchor, "ViT-B-32"))


def test_training_checkpoint_read_through_params_txt(anchor):
    """A custom run name says nothing; params.txt names the model and records --force-quick-gelu."""
    tag = "ViT-B-32-quickgelu"
    ckpt = anchor / f"{tag}-train_params" / f"my-run-{tag}" / "checkpoints" / "epoch_1.pt"
    assert "model: ViT-B-32\n" in (ckpt.parent.parent / "params.txt").read_text()
    model, tokenizer, _ = clipforge.load(ckpt)
    assert model.cfg.vision.act == "quick_gelu"
    check(model, tokenizer, io_of(anchor, tag))
    moved = anchor / "epoch_1_alone.pt"
    moved.symlink_to(ckpt)  # away from its run directory nothing names the model: refused
    with pytest.raises(ValueError, match="does not name its model"):
        clipforge.load(moved)
