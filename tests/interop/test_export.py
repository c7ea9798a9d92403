"""`clipforge export` (HF and clipforge formats) and ONNX export parity with onnxruntime."""
import pytest
import torch

import clipforge
from clipforge.cli.main import main
from clipforge.models import save_model

SIGLIP_LIKE = dict(
    embed_dim=64,
    init_logit_bias=-10.0,
    vision=dict(
        image_size=32,
        patch_size=8,
        width=64,
        layers=2,
        heads=4,
        class_token=False,
        ln_pre=False,
        patch_bias=True,
        pool="map",
        proj=False,
        attn_pool_heads=4,
        act="gelu_tanh",
        ln_eps=1e-6,
    ),
    text=dict(
        vocab_size=300,
        context_length=16,
        width=48,
        layers=2,
        heads=4,
        causal=False,
        pad_mask=False,
        pool="last",
        proj_bias=True,
        act="gelu_tanh",
        ln_eps=1e-6,
    ),
)


def test_cli_export_run_to_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = clipforge.create_model("tiny", seed=3).eval()
    save_model(model, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    pixels, ids = (
        torch.randn(2, 3, 64, 64),
        clipforge.tokenize(["a red circle", "three green stars"], context_length=32),
    )
    with torch.no_grad():
        img = torch.nn.functional.normalize(hf.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt = torch.nn.functional.normalize(hf.get_text_features(input_ids=ids).pooler_output, dim=-1)
        assert (img - model.encode_image(pixels)).abs().max() <= 1e-4
        assert (txt - model.encode_text(ids)).abs().max() <= 1e-4
    # and back: the HF directory loads as the same model
    again, _, _ = clipforge.load(tmp_path / "hf")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    model = clipforge.create_model("tiny", seed=0, vision={"pool": "mean"})
    save_model(model, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "matches neither" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--to", "hf", "--out", str(tmp_path / "x")]) == 2


def test_cli_export_never_writes_over_what_is_there_unasked(tmp_path, capsys):
    """--out that holds files (a photo folder, another model) is refused before the model loads, its files untouched;
    --overwrite writes into it (same names replaced, the rest kept); a file as --out is one line too."""
    save_model(clipforge.create_model("tiny", seed=0), tmp_path / "run")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "config.json").write_text("{}")  # a file an HF export also writes
    (photos / "a.png").write_bytes(b"png")
    args = ["export", str(tmp_path / "run"), "--to", "hf", "--out", str(photos)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is not empty (a.png, config.json)" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (photos / "config.json").read_text() == "{}" and not (photos / "model.safetensors").exists()
    assert main([*args, "--overwrite"]) == 0
    assert (photos / "config.json").read_text() != "{}" and (photos / "a.png").read_bytes() == b"png"
    assert main(["export", str(tmp_path / "run"), "--to", "clipforge", "--out", str(photos / "a.png")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "run"), "--to", "clipforge", "--out", str(tmp_path / "empty")]) == 0


@pytest.mark.parametrize("arch", ["tiny", "siglip-like"])
def test_onnx_parity(tmp_path, arch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from clipforge.interop.onnx_export import OnnxCLIP, export_onnx

    model = (clipforge.create_model("tiny", seed=1) if arch == "tiny"
             else clipforge.create_model(clipforge.CLIPConfig.from_dict(SIGLIP_LIKE), seed=1)).eval()
    export_onnx(model, tmp_path)
    onnx_model = OnnxCLIP(tmp_path)
    size, ctx = model.image_size, model.context_length
    g = torch.Generator().manual_seed(0)
    for batch in (1, 5):  # the batch axis is dynamic
        pixels = torch.randn(batch, 3, size, size, generator=g)
        ids = torch.randint(1, 250, (batch, ctx), generator=g)
        ids[:, -3] = model.cfg.text.eot_token_id if arch == "tiny" else ids[:, -3]
        with torch.no_grad():
            assert (onnx_model.encode_image(pixels) - model.encode_image(pixels)).abs().max().item() <= 1e-4
            assert (onnx_model.encode_text(ids) - model.encode_text(ids)).abs().max().item() <= 1e-4
    if arch == "tiny":  # captions as the tokenizer pads them (zeros after the end token), of different lengths
        ids = clipforge.tokenize(["a red circle", "two small blue squares left of a big green triangle", "x"],
                                 context_length=ctx)
        assert (ids == 0).any(dim=1).all()
        with torch.no_grad():
            assert (onnx_model.encode_text(ids) - model.encode_text(ids)).abs().max().item() <= 1e-4
            assert (onnx_model.encode_text(ids[2:]) - model.encode_text(ids[2:])).abs().max().item() <= 1e-4


def test_onnx_export_keeps_the_tracer_warnings_to_itself(tmp_path, recwarn):
    """The tracer's and opset 17's warnings are about decisions fixed in an exported graph (checked by
    test_onnx_parity); a user exporting a model sees none of them."""
    pytest.importorskip("onnx")
    from clipforge.interop.onnx_export import export_onnx

    export_onnx(clipforge.create_model("tiny", seed=1).eval(), tmp_path)
    assert not [w for w in recwarn if issubclass(w.category, torch.jit.TracerWarning)
                or "advanced indexing" in str(w.message)], [str(w.message)[:80] for w in recwarn]


def test_cli_export_onnx(tmp_path):
    pytest.importorskip("onnx")
    save_model(clipforge.create_model("tiny", seed=0), tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--to", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    assert (tmp_path / "onnx" / "image_encoder.onnx").exists() and (tmp_path / "onnx" / "text_encoder.onnx").exists()


def test_onnx_int8_export_is_smaller_and_stays_close_to_the_model(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from clipforge.interop.onnx_export import OnnxCLIP, export_onnx

    model = clipforge.create_model("tiny", seed=1).eval()
    export_onnx(model, tmp_path / "fp32")
    export_onnx(model, tmp_path / "int8", quantize="int8")
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        size_fp32, size_int8 = (tmp_path / "fp32" / name).stat().st_size, (tmp_path / "int8" / name).stat().st_size
        assert size_int8 < 0.4 * size_fp32, (name, size_int8, size_fp32)
    quantized = OnnxCLIP(tmp_path / "int8")
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ids = clipforge.tokenize(["a red circle", "three green stars", "a blue square left of a star", "two cats"],
                             context_length=32)
    with torch.no_grad():
        cos_i = torch.nn.functional.cosine_similarity(quantized.encode_image(pixels), model.encode_image(pixels))
        cos_t = torch.nn.functional.cosine_similarity(quantized.encode_text(ids), model.encode_text(ids))
    # int8 weights change the embeddings a little, not their direction
    assert cos_i.min() > 0.98 and cos_t.min() > 0.98, (cos_i, cos_t)
    assert (cos_i < 1 - 1e-6).any()  # and they really are quantized: not bit-equal to float32


def test_quantized_onnx_export_is_refused_by_load_and_training(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from clipforge.errors import ConfigError

    save_model(clipforge.create_model("tiny", seed=0), tmp_path / "run")
    out = tmp_path / "int8"
    assert main(["export", str(tmp_path / "run"), "--to", "onnx", "--quantize", "int8", "--out", str(out)]) == 0
    assert "onnx (int8)" in capsys.readouterr().out
    for source in (out, out / "text_encoder.onnx"):
        with pytest.raises(ConfigError, match="int8-quantized ONNX export.*cannot be trained"):
            clipforge.load(source)
    assert main(["train", f"out_dir={tmp_path / 'train'}", f"init_from={out}", "steps=1"]) == 2
    err = capsys.readouterr().err
    assert "int8-quantized ONNX export" in err and len(err.strip().splitlines()) == 1
    args = ["export", str(tmp_path / "run"), "--to", "hf", "--quantize", "int8", "--out", str(tmp_path / "x")]
    assert main(args) == 2
    assert "--quantize int8 applies to --to onnx only" in capsys.readouterr().err
