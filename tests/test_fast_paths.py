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
