"""The fused inference layers (clipforge.models.fused_inference) compute what PyTorch's public operators compute.

``CLIP.to_inference`` swaps the linear layers of every transformer block for oneDNN's linear with the bias and
GELU in its epilogue; the reference is the same weights run with ``F.linear`` and ``F.gelu`` (the unfused
model, or the formula written out here). Speed is measured by benchmarks/bench_inference.py, not asserted.
"""
import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models import create_model
from clipforge.models.fused_inference import (
    AVX2_FP32_MAX_ROWS,
    FusedLinear,
    _kernels_check,
    fuse_for_inference,
    row_limit,
    unfuse,
)

needs_kernels = pytest.mark.skipif(_kernels_check(torch.float32) is not None,
                                   reason="oneDNN's fused linear is unavailable in this PyTorch")
needs_bf16 = pytest.mark.skipif(_kernels_check(torch.bfloat16) is not None,
                                reason="no native bf16 oneDNN kernels on this CPU")


def _inputs(model, n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size, ctx = model.image_size, model.context_length
    pixels = torch.randn(n, 3, size, size, generator=g)
    ids = torch.zeros(n, ctx, dtype=torch.long)
    for i in range(n):  # start token, words, end-of-text, padding; lengths differ so the trimmed text pass runs
        length = 4 + 3 * i
        ids[i, 0] = 49406
        ids[i, 1:length - 1] = torch.randint(1, 40000, (length - 2,), generator=g)
        ids[i, length - 1] = 49407
    return pixels, ids


@needs_kernels
@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh"])
def test_fused_linear_is_linear_then_activation(act):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(24, 40)
    x = torch.randn(6, 24, 3, generator=g).transpose(1, 2)  # [6, 3, 24], not contiguous
    y = x.matmul(lin.weight.T) + lin.bias  # the formula, not F.linear
    if act == "gelu":
        y = 0.5 * y * (1 + torch.erf(y / 2**0.5))
    elif act == "gelu_tanh":
        y = 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y**3)))
    with torch.no_grad():
        got = FusedLinear(lin, act)(x)
        flat = FusedLinear(lin, act)(x.reshape(18, 24))  # 2-D input too
    torch.testing.assert_close(got, y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flat, y.detach().reshape(18, 40), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        FusedLinear(lin, "relu")


@needs_kernels
def test_inputs_of_more_than_max_rows_take_the_plain_operators(monkeypatch):
    lin = nn.Linear(24, 40)
    layer = FusedLinear(lin, "gelu", max_rows=8)
    kernel_calls = []
    real = layer._kernel_weight
    monkeypatch.setattr(layer, "_kernel_weight", lambda: (kernel_calls.append(1), real())[1])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for shape, fused in (((2, 4, 24), True), ((8, 24), True), ((3, 3, 24), False), ((9, 24), False)):
            x = torch.randn(*shape, generator=g)
            y = x.matmul(lin.weight.T) + lin.bias
            expected = 0.5 * y * (1 + torch.erf(y / 2**0.5))  # exact GELU, the formula
            before = len(kernel_calls)
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
            assert (len(kernel_calls) > before) == fused, shape  # 8 rows fused, 9 rows plain
    assert "max_rows=8" in repr(layer) and "max_rows" not in repr(FusedLinear(lin))


@needs_kernels
def test_the_row_limit_applies_to_fp32_on_cpus_without_avx512(monkeypatch):
    for capability, limit in (("AVX2", AVX2_FP32_MAX_ROWS), ("DEFAULT", AVX2_FP32_MAX_ROWS), ("AVX512", None)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert row_limit(torch.float32) == limit and row_limit(torch.bfloat16) is None, capability
        model = create_model("tiny", seed=0).to_inference()
        layers = [m for m in model.modules() if type(m) is FusedLinear]
        assert layers and all(m.max_rows == limit for m in layers), capability


@needs_kernels
def test_to_inference_fuses_every_block_and_matches_the_plain_layers_in_float32():
    model = create_model("tiny", seed=0).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pixels, ids = _inputs(model)
    with torch.no_grad():
        image_ref, text_ref = model.encode_image(pixels), model.encode_text(ids)
    fused = copy.deepcopy(model).to_inference()
    blocks = [b for tower in (fused.visual, fused.text) for b in tower.transformer.blocks]
    assert all(type(b.attn.in_proj) is FusedLinear and type(b.mlp[0]) is FusedLinear and b.mlp[0].act == "gelu"
               and type(b.mlp[1]) is nn.Identity and type(b.mlp[2]) is FusedLinear for b in blocks)
    with torch.inference_mode():
        torch.testing.assert_close(fused.encode_image(pixels), image_ref, rtol=0, atol=2e-6)
        torch.testing.assert_close(fused.encode_text(ids), text_ref, rtol=0, atol=2e-6)
    again = fused.state_dict()  # same keys, same tensors: checkpoints and exports do not see the fusion
    assert list(again) == list(state) and all(torch.equal(again[k], v) for k, v in state.items())


@needs_bf16
def test_bf16_fused_model_stays_close_to_float32_and_to_the_plain_bf16_layers():
    model = create_model("tiny", seed=0).eval()
    pixels, ids = _inputs(model, n=7)
    with torch.no_grad():
        image_ref, text_ref = model.encode_image(pixels), model.encode_text(ids)
    fused = copy.deepcopy(model).to_inference("bf16")
    plain = copy.deepcopy(model).to_inference("bf16")
    assert unfuse(plain) == 8 and type(plain.visual.transformer.blocks[0].attn.in_proj) is nn.Linear
    with torch.inference_mode():
        for encode, x, ref in (("encode_image", pixels, image_ref), ("encode_text", ids, text_ref)):
            got, base = getattr(fused, encode)(x), getattr(plain, encode)(x)
            assert got.dtype == torch.float32
            assert F.cosine_similarity(got, ref).min() > 0.999
            assert (got - base).abs().max() < 1e-2  # bf16 rounding of two kernel orders, not a different function
    # the reordered bf16 weights are a cache: copies, pickles and a changed weight all work
    clone = copy.deepcopy(fused)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    with torch.inference_mode():
        torch.testing.assert_close(clone.encode_image(pixels), fused.encode_image(pixels))
    layer, x = clone.visual.transformer.blocks[0].mlp[2], torch.randn(3, 512).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.mul_(-2)  # a changed weight is reordered again, not read from the stale cache
        torch.testing.assert_close(layer(x).float(), layer.plain(x).float(), rtol=2e-2, atol=2e-2)


@needs_kernels
def test_tracing_sees_the_public_operators():
    model = create_model("tiny", seed=0).to_inference()
    pixels, _ = _inputs(model, n=2)
    with torch.inference_mode():
        eager = model.encode_image(pixels)
    traced = torch.jit.trace(lambda p: model.encode_image(p), pixels, check_trace=False)
    graph = str(traced.graph)
    assert "mkldnn" not in graph and "aten::linear" in graph and "aten::gelu" in graph
    with torch.inference_mode():
        torch.testing.assert_close(traced(pixels), eager, rtol=0, atol=2e-6)


def test_checking_the_kernels_leaves_the_random_stream_alone():
    _kernels_check.cache_clear()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    _kernels_check(torch.float32)
    assert torch.equal(torch.rand(4), expected)


def test_models_off_the_fast_path_are_left_as_they_are(caplog, monkeypatch):
    model = create_model("tiny", seed=0).to(torch.float64)
    assert fuse_for_inference(model) == 0 and type(model.visual.transformer.blocks[0].mlp[0]) is nn.Linear
    model = create_model("tiny", seed=0).to_inference()  # fused in float32, then cast to float64: plain again
    pixels, ids = _inputs(model, n=2)
    model.to_inference(torch.float64)
    assert type(model.visual.transformer.blocks[0].mlp[0]) is nn.Linear
    assert type(model.text.transformer.blocks[0].attn.in_proj) is nn.Linear
    with torch.inference_mode():
        assert model.encode_image(pixels).dtype == torch.float64 and model.encode_text(ids).isfinite().all()
    import clipforge.models.fused_inference as fi

    monkeypatch.setattr(fi, "_kernels_check", lambda dtype: "oneDNN's linear failed here (RuntimeError: test)")
    model = create_model("tiny", seed=0)
    with caplog.at_level(logging.WARNING, logger="clipforge.models.fused_inference"):
        assert fuse_for_inference(model) == 0
    assert "fused inference layers not used (oneDNN's linear failed here" in caplog.text
    assert type(model.visual.transformer.blocks[0].attn.in_proj) is nn.Linear
