"""clipforge.models.compiled_encoder: the image tower through torch.compile with frozen weights, one batch size.

The reference is the eager model's own ``encode_image`` on the same images. ``aot_eager`` (dynamo + AOT graphs, no
C++ code generation) checks the chunking and padding exactly and quickly; one test compiles with inductor and
freezing, the path ``clipforge embed --compile`` takes, and compares within bf16 rounding."""
import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.cli.main import main
from clipforge.errors import ConfigError
from clipforge.models import create_model, save_model
from clipforge.models.compiled_encoder import CompiledImageEncoder


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _images(n, size, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_any_number_of_images_gives_the_eager_embeddings_with_one_graph():
    model = create_model("tiny", seed=0).to_inference()
    encoder = CompiledImageEncoder(model, batch_size=4, backend="aot_eager")
    images = _images(11, model.image_size)
    with torch.no_grad():
        ref = model.encode_image(images)
    shapes = []
    real = encoder._compiled
    encoder._compiled = lambda chunk: (shapes.append(tuple(chunk.shape)), real(chunk))[1]
    for n in (1, 3, 4, 5, 11):  # padded, padded, exact, one chunk + padded, two chunks + padded
        out = encoder(images[:n])
        assert out.shape == (n, model.cfg.embed_dim)
        torch.testing.assert_close(out, ref[:n], rtol=1e-5, atol=1e-6)
    assert set(shapes) == {(4, 3, model.image_size, model.image_size)}  # every call at the compiled batch size
    assert encoder.failed is None and encoder.compile_seconds is not None


def test_inductor_with_frozen_weights_matches_eager_in_bf16():
    model = create_model("tiny", seed=0).to_inference("bf16")
    encoder = CompiledImageEncoder(model, batch_size=3)  # inductor, freezing on
    images = _images(5, model.image_size, seed=1)
    with torch.no_grad():
        ref = model.encode_image(images)
    out = encoder(images)
    assert encoder.failed is None, encoder.failed  # really compiled (this machine has a C++ compiler)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(out, ref)
    assert cos.min() > 0.999, cos  # bf16 rounding of differently fused kernels, not a different function


def test_a_model_that_can_still_train_is_refused_and_bad_batches_are_named():
    with pytest.raises(ConfigError, match="to_inference"):
        CompiledImageEncoder(create_model("tiny", seed=0), batch_size=4)
    model = create_model("tiny", seed=0).to_inference()
    with pytest.raises(ConfigError, match="at least 1"):
        CompiledImageEncoder(model, batch_size=0)
    encoder = CompiledImageEncoder(model, batch_size=2, backend="aot_eager")
    with pytest.raises(ValueError, match="non-empty batch"):
        encoder(torch.zeros(0, 3, model.image_size, model.image_size))


def test_a_compiler_failure_warns_once_and_embeds_eagerly():
    from torch._dynamo.exc import TorchDynamoException

    model = create_model("tiny", seed=0).to_inference()
    encoder = CompiledImageEncoder(model, batch_size=2, backend="aot_eager")
    calls = []

    def broken(chunk):
        calls.append(1)
        raise TorchDynamoException("no C++ compiler")

    encoder._compiled = broken
    images = _images(3, model.image_size)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        out = encoder(images)
    assert encoder.failed and len(calls) == 1  # not retried for the second chunk
    with torch.no_grad():
        torch.testing.assert_close(out, model.encode_image(images))


def test_embed_compile_writes_the_embeddings_of_the_eager_command(tmp_path, monkeypatch, capsys):
    import clipforge.models.compiled_encoder as compiled

    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    run = save_model(clipforge.create_model("tiny", seed=0), tmp_path / "model")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(5):
        Image.new("RGB", (70, 60), (40 * i, 200 - 30 * i, 90)).save(imgs / f"{i}.png")
    for flags, name in (([], "eager"), (["--compile"], "compiled")):
        assert main(["embed", str(run), "--images", str(imgs), "--batch-size", "2", *flags, "--quiet",
                     "--out", str(tmp_path / f"{name}.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "compiled.npy"), np.load(tmp_path / "eager.npy"), rtol=1e-5,
                               atol=1e-6)
    assert main(["embed", str(run), "--texts", "a red circle", "--compile", "--out", str(tmp_path / "t.npy")]) != 0
    assert "texts run eagerly" in capsys.readouterr().err and not (tmp_path / "t.npy").exists()
