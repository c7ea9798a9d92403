import math

import pytest
import torch

import clipforge
from clipforge.models import CLIPConfig, create_model, get_model_config, list_models, register_model


@pytest.fixture(scope="module")
def tiny():
    return create_model("tiny", seed=0).eval()


def test_registry_has_standard_shapes():
    names = list_models()
    for n in ("tiny", "ViT-B-32", "ViT-B-16", "ViT-L-14"):
        assert n in names


@pytest.mark.parametrize("name,params_m", [("ViT-B-32", 151.28), ("ViT-B-16", 149.62), ("ViT-L-14", 427.62)])
def test_standard_parameter_counts_match_openai(name, params_m):
    # OpenAI's published models have these parameter counts (with their 49408-token vocabulary).
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.01)


def test_output_shapes_and_normalization(tiny):
    images = torch.randn(3, 3, 64, 64)
    texts = clipforge.tokenize(["a red circle", "two blue squares", ""], context_length=32)
    out = tiny(images, texts)
    assert out["image_features"].shape == (3, 128)
    assert out["text_features"].shape == (3, 128)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out["logit_bias"] is None
    raw = tiny.encode_image(images, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))


def test_padding_does_not_change_text_embedding(tiny):
    short = clipforge.tokenize(["three red circles"], context_length=16)
    long = clipforge.tokenize(["three red circles"], context_length=32)
    assert torch.allclose(tiny.encode_text(short), tiny.encode_text(long), atol=1e-5)
    # changing the padding tokens themselves must not matter either (causal mask + EOT pooling)
    noisy = long.clone()
    eot = int((noisy[0] == 49407).nonzero()[0])
    noisy[0, eot + 1 :] = 123
    assert torch.allclose(tiny.encode_text(noisy), tiny.encode_text(long), atol=1e-5)


def test_batch_independence(tiny):
    images = torch.randn(4, 3, 64, 64)
    full = tiny.encode_image(images)
    single = torch.cat([tiny.encode_image(images[i : i + 1]) for i in range(4)])
    assert torch.allclose(full, single, atol=1e-5)


def _naive_query_attention(query, x, mha):
    """One learned query attending over tokens ``x`` [B, N, w], head by head, from the module's raw weights."""
    w = x.shape[-1]
    heads, dh = mha.num_heads, w // mha.num_heads
    wq, wk, wv = mha.in_proj_weight.split(w)
    bq, bk, bv = mha.in_proj_bias.split(w)
    out = torch.zeros(x.shape[0], w)
    for b in range(x.shape[0]):
        q, k, v = query @ wq.T + bq, x[b] @ wk.T + bk, x[b] @ wv.T + bv
        heads_out = []
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            scores = torch.stack([(q[sl] * k[n, sl]).sum() for n in range(k.shape[0])]) / math.sqrt(dh)
            weights = scores.exp() / scores.exp().sum()
            heads_out.append((weights[:, None] * v[:, sl]).sum(0))
        out[b] = torch.cat(heads_out) @ mha.out_proj.weight.T + mha.out_proj.bias
    return out


def _naive_layer_norm(y, ln):
    mu = y.mean(-1, keepdim=True)
    var = ((y - mu) ** 2).mean(-1, keepdim=True)
    return (y - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


@pytest.mark.parametrize("pool", ["cls", "mean", "attn", "map"])
def test_pooling_variants(pool):
    """Each pooling is its definition, recomputed from the tower's tokens: the class token, the mean of the patch
    tokens, one learned query attending over all tokens (then LayerNorm), SigLIP's MAP head (y + MLP(LN(y)))."""
    model = create_model("tiny", seed=0, vision={"pool": pool}).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = model.visual.forward_tokens(images)  # [B, 1 + grid^2, w], class token first
        patches = tokens[:, 1:]
        if pool == "cls":
            ref = tokens[:, 0]
        elif pool == "mean":
            ref = sum(patches[:, n] for n in range(patches.shape[1])) / patches.shape[1]
        elif pool == "attn":
            head = model.visual.attn_pool
            ref = _naive_layer_norm(_naive_query_attention(head.query[0, 0], tokens, head.attn), head.ln)
        else:
            head = model.visual.attn_pool
            y = _naive_query_attention(head.probe[0, 0], tokens, head.attn)
            hidden = torch.nn.functional.gelu(_naive_layer_norm(y, head.ln) @ head.mlp[0].weight.T + head.mlp[0].bias)
            ref = y + hidden @ head.mlp[2].weight.T + head.mlp[2].bias
        got = model.encode_image(images, normalize=False)
    assert got.shape == (2, 128)
    assert torch.allclose(got, ref @ model.visual.proj, atol=1e-5)
    assert not torch.allclose(ref, tokens[:, 1], atol=1e-3)  # the reference is not just some token


def test_siglip_bias_init():
    model = create_model("tiny", init_logit_bias=-10.0, init_logit_scale=math.log(10))
    out = model(texts=clipforge.tokenize(["x"], context_length=32))
    assert out["logit_bias"].item() == -10.0
    assert out["logit_scale"].item() == pytest.approx(10.0)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    images, texts = torch.randn(2, 3, 64, 64), clipforge.tokenize(["a", "b c"], context_length=32)
    grads = []
    for ckpt in (False, True):
        model = create_model("tiny", seed=0)
        model.set_grad_checkpointing(ckpt)
        out = model(images, texts)
        (out["image_features"] @ out["text_features"].t()).sum().backward()
        grads.append(model.visual.patch_embed.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_seeded_creation_is_deterministic_and_does_not_touch_global_rng():
    state = torch.get_rng_state()
    a, b = create_model("tiny", seed=3), create_model("tiny", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na


def test_bad_inputs_give_clear_errors(tiny):
    with pytest.raises(ValueError, match="64x64"):
        tiny.encode_image(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="context length"):
        tiny.encode_text(torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(ValueError, match="divisible"):
        create_model("tiny", vision={"patch_size": 7})
    with pytest.raises(ValueError, match="unknown model config keys"):
        CLIPConfig.from_dict({"embed_dim": 8, "wat": 1})


def test_register_model_and_json_path(tmp_path):
    cfg = get_model_config("tiny")
    cfg.embed_dim = 64
    register_model("tiny-64-test", cfg, overwrite=True)
    assert create_model("tiny-64-test").cfg.embed_dim == 64
    p = tmp_path / "m.json"
    import json

    p.write_text(json.dumps(cfg.to_dict()))
    assert create_model(str(p)).cfg.embed_dim == 64


def test_save_and_load_model_roundtrip(tmp_path, tiny):
    from clipforge.models import load_model, save_model

    save_model(tiny, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(loaded.encode_image(x), tiny.encode_image(x))


def test_wrong_checkpoint_keys_and_shapes_are_named(tmp_path, tiny):
    from safetensors.torch import save_file

    from clipforge.models import load_weights

    sd = {k: v.clone() for k, v in tiny.state_dict().items()}
    extra = dict(sd)
    extra["visual.bogus"] = torch.zeros(1)
    del extra["logit_scale"]
    save_file(extra, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyError) as e:
        load_weights(create_model("tiny"), tmp_path / "bad.safetensors")
    assert "logit_scale" in str(e.value) and "visual.bogus" in str(e.value)
    shaped = dict(sd)
    shaped["visual.proj"] = torch.zeros(3, 3)
    save_file(shaped, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match="visual.proj"):
        load_weights(create_model("tiny"), tmp_path / "shape.safetensors")


def test_variant_configs_parse_through_one_helper():
    from clipforge.models.coca import CoCaConfig, MultimodalConfig
    from clipforge.models.mobileclip import MCiConfig, MobileCLIPConfig
    from clipforge.models.moe import MoECLIPConfig, MoEConfig

    base = get_model_config("tiny").to_dict()
    moe = MoECLIPConfig.from_dict({**base, "moe": {"experts": 3, "top_k": 1}})
    assert moe.moe == MoEConfig(experts=3, top_k=1) and moe.vision == CLIPConfig.from_dict(base).vision
    assert MoECLIPConfig.from_dict(moe.to_dict()) == moe  # a saved config reads back unchanged
    assert MoECLIPConfig.from_dict(base).moe == MoEConfig()  # an absent section keeps the default
    coca = CoCaConfig.from_dict({**base, "multimodal": {"layers": 1, "heads": 2, "n_queries": 4,
                                                        "pool_heads": 2}})
    assert coca.multimodal.layers == 1 and isinstance(coca.multimodal, MultimodalConfig)
    # MobileCLIP's text defaults (bidirectional, padding visible) sit under the values given
    mc = get_model_config("mobileclip-tiny").to_dict()
    mc["text"].pop("causal"), mc["text"].pop("pad_mask")
    parsed = MobileCLIPConfig.from_dict({**mc, "reparameterized": 1})
    assert parsed.text.causal is False and parsed.text.pad_mask is False and parsed.reparameterized is True
    assert isinstance(parsed.mci, MCiConfig)
    with pytest.raises(ValueError, match="unknown model config keys"):
        MoECLIPConfig.from_dict({**base, "mci": {}})  # another variant's section is no key of this one
    with pytest.raises(TypeError, match="subclass"):
        CLIPConfig.variant_from_dict(base, {})
