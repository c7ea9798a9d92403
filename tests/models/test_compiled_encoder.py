"""clipforge.models.compiled_encoder: the image tower through torch.compile with frozen weights, one batch size.

The reference is the eager model's own ``encode_image`` on the same images. ``aot_eager`` (dynamo + AOT graphs, no
C++ code generation) checks the chunking and padding exactly and quickly; one test compiles with inductor and
freezing, the path ``clipforge embed --compile`` takes, and compares within bf16 rounding."""
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.cli.main import main
from clipforge.errors import ConfigError
from clipforge.models import create_model, save_model
from clipforge.models.compiled_encoder import CompiledImageEncoder
from clipforge.train.device import cpu_has_fast_bf16


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _images(n, size, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_any_number_of_images_gives_the_eager_embeddings_with_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend

    model = create_model("tiny", seed=0).to_inference()
    counter = CompileCounterWithBackend("aot_eager")  # counts the graphs dynamo hands to the backend
    encoder = CompiledImageEncoder(model, batch_size=4, backend=counter)
    images = _images(11, model.image_size)
    with torch.no_grad():
        ref = model.encode_image(images)
    contexts = [torch.no_grad, torch.inference_mode, torch.enable_grad]  # the caller's mode must not matter
    for k, n in enumerate((1, 3, 4, 5, 11)):  # padded, padded, exact, one chunk + padded, two chunks + padded
        context = contexts[k % 3]
        with context():
            out = encoder(images[:n])
        assert out.shape == (n, model.cfg.embed_dim) and not out.requires_grad
        assert out.is_inference() == (context is torch.inference_mode)  # a normal tensor unless the caller asked
        torch.testing.assert_close(out, ref[:n], rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1  # one graph for every batch and mode: nothing recompiled
    assert encoder.failed is None and encoder.compile_seconds is not None


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler")
def test_inductor_with_frozen_weights_matches_eager_in_bf16():
    from torch._inductor.utils import run_and_get_code

    model = create_model("tiny", seed=0).to_inference("bf16")
    encoder = CompiledImageEncoder(model, batch_size=3)  # inductor, freezing on
    images = _images(5, model.image_size, seed=1)
    with torch.no_grad():
        ref = model.encode_image(images)
    out, code = run_and_get_code(encoder, images)
    assert encoder.failed is None, encoder.failed  # really compiled
    code = "\n".join(code)
    assert "_frozen_param" in code  # frozen: the weights are constants of the graph
    # the linear layers run oneDNN's prepacked kernel where oneDNN has native bf16 (AVX-512 BF16, AMX); without it
    # (AVX2 only) inductor's oneDNN passes leave bf16 alone and the products are plain (add)mm calls
    if cpu_has_fast_bf16():
        assert "mkldnn._linear_pointwise" in code
    else:
        assert "mkldnn._linear_pointwise" not in code and "extern_kernels.mm" in code
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
    calls = []
    real_init = compiled.CompiledImageEncoder.__init__
    monkeypatch.setattr(compiled.CompiledImageEncoder, "__init__",
                        lambda self, *a, **k: (calls.append(a[1]), real_init(self, *a, **k))[1])
    for flags, name in (([], "eager"), (["--compile"], "compiled")):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn: fail instead
            assert main(["embed", str(run), "--images", str(imgs), "--batch-size", "2", *flags, "--quiet",
                         "--out", str(tmp_path / f"{name}.npy")]) == 0
    assert calls == [2]  # only --compile built the compiled encoder, for the batch size
    np.testing.assert_allclose(np.load(tmp_path / "compiled.npy"), np.load(tmp_path / "eager.npy"), rtol=1e-5,
                               atol=1e-6)
    assert main(["embed", str(run), "--texts", "a red circle", "--compile", "--out", str(tmp_path / "t.npy")]) != 0
    assert "texts run eagerly" in capsys.readouterr().err and not (tmp_path / "t.npy").exists()
    assert main(["embed", str(run), "--images", str(imgs), "--compile", "--batch-size", "0",
                 "--out", str(tmp_path / "z.npy")]) != 0
    assert "--batch-size must be at least 1" in capsys.readouterr().err
