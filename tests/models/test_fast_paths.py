"""The training fast paths compute what the straightforward code computes.

``short_attention`` (CPU attention for short sequences while training) against
``F.scaled_dot_product_attention``, the patch embedding as a GEMM against the convolution,
and a whole ``tiny``-shaped training step through both paths. Speed is measured by
benchmarks/bench_train_throughput.py, not asserted here.
"""
import pytest
import torch
import torch.nn.functional as F

import clipforge.models.transformer as transformer
from clipforge.models import create_model
from clipforge.models.transformer import short_attention

SMALL = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
         "text": {"context_length": 16, "width": 32, "layers": 2, "heads": 2}}


def _reference_attention(qkv, heads, is_causal):
    b, n, c3 = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, c3 // 3 // heads).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal).transpose(1, 2).reshape(b, n, c3 // 3)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", [(3, 17, 4, 8), (2, 65, 2, 32)])
def test_short_attention_matches_sdpa_values_and_gradients(is_causal, shape):
    b, n, h, d = shape
    torch.manual_seed(0)
    qkv = torch.randn(b, n, 3 * h * d, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(b, n, h * d, dtype=torch.float64)
    ours = short_attention(qkv, h, is_causal)
    (g_ours,) = torch.autograd.grad(ours, qkv, grad_out)
    ref = _reference_attention(qkv, h, is_causal)
    (g_ref,) = torch.autograd.grad(ref, qkv, grad_out)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-10)


def test_short_attention_bf16_is_within_bf16_rounding():
    torch.manual_seed(0)
    qkv = torch.randn(4, 32, 3 * 64)
    ref = _reference_attention(qkv, 4, True)
    ours = short_attention(qkv.bfloat16(), 4, True).float()
    torch.testing.assert_close(ours, ref, rtol=0, atol=3e-2)


def test_patch_embedding_gemm_equals_convolution():
    model = create_model("tiny", seed=0, vision={"patch_bias": True})
    v = model.visual
    with torch.no_grad():
        v.patch_embed.bias.normal_()
    pixels = torch.randn(3, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    v = v.double()
    ours = v.embed_patches(pixels)
    conv = v.patch_embed(pixels).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours, conv, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ours)
    grads_ours = torch.autograd.grad(ours, [pixels, v.patch_embed.weight, v.patch_embed.bias], g)
    grads_conv = torch.autograd.grad(conv, [pixels, v.patch_embed.weight, v.patch_embed.bias], g)
    for a, b in zip(grads_ours, grads_conv):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _step_grads(model, images, texts):
    out = model(images, texts)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    labels = torch.arange(len(images))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def test_training_step_same_with_and_without_the_fast_attention(monkeypatch):
    model = create_model("tiny", seed=0, **SMALL).double().train()
    images = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    texts = torch.randint(1, 1000, (6, 16))
    texts[:, 9] = 49407
    texts[:, 10:] = 0
    fast_out, fast = _step_grads(model, images, texts)
    monkeypatch.setattr(transformer, "use_short_attention", lambda x, mask: False)
    ref_out, ref = _step_grads(model, images, texts)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(fast_out[key], ref_out[key], rtol=1e-10, atol=1e-10)
    assert fast.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-8, atol=1e-10, msg=name)


def test_short_attention_only_where_it_applies():
    x = torch.zeros(2, 300, 8)
    assert not transformer.use_short_attention(x, None)  # long sequences keep the flash kernel
    x = torch.zeros(2, 30, 8)
    assert transformer.use_short_attention(x, None)
    assert not transformer.use_short_attention(x, torch.ones(2, 1, 1, 30, dtype=torch.bool))  # padding masks: SDPA
    with torch.no_grad():
        assert not transformer.use_short_attention(x, None)  # inference keeps SDPA's fused kernels


@pytest.fixture
def fresh_compile(monkeypatch):
    import clipforge.models.compile as comp

    monkeypatch.setattr(comp, "_compiled", None)
    monkeypatch.setattr(comp, "_failed", None)
    monkeypatch.setattr(comp, "BACKEND", "aot_eager")  # dynamo + AOT autograd without inductor's C++ compile time
    return comp


def test_compile_flag_trains_through_torch_compile_with_the_same_results(fresh_compile):
    import torch._dynamo

    torch._dynamo.reset()
    eager = create_model("tiny", seed=0, **SMALL).train()
    compiled = create_model("tiny", seed=0, **SMALL, compile=True).train()
    assert compiled.cfg.compile and "compile" in compiled.cfg.to_dict()
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(1, 1000, (4, 16))
    texts[:, 5] = 49407
    ref_out, ref = _step_grads(eager, images, texts)
    out, grads = _step_grads(compiled, images, texts)
    assert fresh_compile._compiled is not None and fresh_compile.compile_failed() is None
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key], ref_out[key], rtol=1e-5, atol=1e-5)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
    # evaluation stays eager: no compilation for no-grad passes
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(images, texts)["image_features"], eager.eval()(images, texts)["image_features"]
        )


def test_compile_failure_warns_once_and_trains_eagerly(fresh_compile, monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    def broken(*args, **kwargs):
        raise TorchDynamoException("no working C++ compiler")

    monkeypatch.setattr(fresh_compile, "_call_tower", broken)  # what torch.compile would wrap
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    eager = create_model("tiny", seed=0, **SMALL).train()
    model = create_model("tiny", seed=0, **SMALL, compile=True).train()
    images, texts = torch.randn(2, 3, 32, 32), torch.randint(1, 1000, (2, 16))
    with pytest.warns(RuntimeWarning, match="no working C\\+\\+ compiler"):
        out = model(images, texts)
    assert "TorchDynamoException" in fresh_compile.compile_failed()
    torch.testing.assert_close(out["image_features"], eager(images, texts)["image_features"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        model(images, texts)


def test_compile_does_not_swallow_ordinary_errors(fresh_compile):
    model = create_model("tiny", seed=0, **SMALL, compile=True).train()
    with pytest.raises(ValueError, match="expected 32x32 images"):
        model(torch.randn(2, 3, 48, 48), torch.randint(1, 1000, (2, 16)))
    assert fresh_compile.compile_failed() is None
