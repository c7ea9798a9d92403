"""MobileCLIP (Vasu et al., 2024): MCi / MCt towers, structural reparameterization against the unfolded
form in float64 (whole model, and one RepMixer against its equation written out here), the errors,
save/load of both forms, the named configs, and training through clipforge train."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.models import create_model, get_model_config, load_model, save_model
from clipforge.models.mobileclip import MCi, MCt, MobileCLIP, MobileCLIPConfig, MobileOneBlock, RepMixer, reparameterize

SMALL = dict(embed_dim=16, vision={"image_size": 32},
             mci={"layers": [1, 1, 1], "dims": [8, 16, 32], "token_mixers": ["repmixer", "repmixer", "attention"],
                  "head_dim": 8, "mlp_ratio": 2.0},
             text={"context_length": 12, "width": 16, "layers": 1, "heads": 2},
             mct={"kernel": 5})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters and O(1) layer scales, so that every
    branch of the training form matters in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype) + 0.5)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * 0.5)
    return model


def small_model(seed=0, dtype=torch.float64) -> MobileCLIP:
    return randomize(create_model("mobileclip-tiny", seed=seed, **SMALL).to(dtype), seed).eval()


def test_configs_build():
    tiny, s0 = get_model_config("mobileclip-tiny"), get_model_config("mobileclip-s0")
    assert isinstance(tiny, MobileCLIPConfig) and isinstance(s0, MobileCLIPConfig)
    assert s0.mci.layers == (2, 6, 10, 2) and s0.mci.dims == (64, 128, 256, 512) and s0.vision.image_size == 256
    assert s0.text.width == 512 and s0.text.layers == 4 and not s0.text.causal
    model = create_model("mobileclip-s0", seed=0)
    assert isinstance(model, MobileCLIP) and isinstance(model.visual, MCi) and isinstance(model.text, MCt)
    n_image = sum(p.numel() for p in model.visual.parameters())
    n_text = sum(p.numel() for p in model.text.parameters())
    # the paper's S0: 11.4 M image + 42.4 M text parameters (ours: no squeeze-excite in the head block)
    assert 10.5e6 < n_image < 11.6e6 and 41.5e6 < n_text < 42.6e6, (n_image, n_text)
    assert [type(b).__name__ for b in [*model.text.first, *model.text.last]] == ["RepMixerBlock", "RepMixerBlock"]


def test_forward_shapes_and_features():
    model = create_model("mobileclip-tiny", seed=0, **SMALL).eval()
    ids = clipforge.tokenize(["a red circle", "two blue squares"], 12)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), ids)
    assert out["image_features"].shape == (2, 16) and out["text_features"].shape == (2, 16)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="32x32"):
        model.encode_image(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="no patch tokens"):
        model(torch.randn(2, 3, 32, 32), ids, return_tokens=True)


def test_reparameterized_equals_training_form():
    """Every folded module (MobileOne blocks, large-kernel convs, RepMixers, RepCPE, ConvFFN conv-BN) in
    one model: image and text embeddings equal the training form's in evaluation mode, float64."""
    model = small_model()
    folded = reparameterize(model)
    assert folded.cfg.reparameterized and not model.cfg.reparameterized
    # the folded towers hold no branch modules, and BatchNorm only as the attention blocks' pre-norm
    names = [n for n, _ in folded.named_modules()]
    assert not any(n.endswith((".scale", ".skip", ".small", ".mixer", ".pe")) for n in names)
    assert all(n.endswith(".norm") for n, m in folded.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ids = clipforge.tokenize(["a red circle", "two blue squares left of a star", ""], 12)
    with torch.no_grad():
        a, b = model.visual(images), folded.visual(images)
        t, u = model.text(ids), folded.text(ids)
    assert a.abs().max() > 1e-3 and t.abs().max() > 1e-3
    assert torch.allclose(a, b, rtol=0, atol=1e-10 * a.abs().max()), (a - b).abs().max()
    assert torch.allclose(t, u, rtol=0, atol=1e-10 * t.abs().max()), (t - u).abs().max()


def test_repmixer_fold_against_its_equation():
    """RepMixer written out: x + s * (BN_c(DWConv_3(x)) + BN_1(Conv_1x1(x)) + BN_id(x) - BN_norm(x)),
    each BN as (y - mean) / sqrt(var + eps) * gamma + beta; its folded conv gives the same."""
    torch.manual_seed(0)
    dim = 4
    mixer = randomize(RepMixer(dim, 3, 1.0).double()).eval()
    x = torch.randn(2, dim, 5, 6, dtype=torch.float64)

    def bn(y, m):
        shape = (1, -1, 1, 1)
        return (y - m.running_mean.view(shape)) / (m.running_var.view(shape) + m.eps).sqrt() * m.weight.view(shape) \
            + m.bias.view(shape)

    mo, nm = mixer.mixer, mixer.norm
    expected = x + mixer.layer_scale * (bn(F.conv2d(x, mo.conv.conv.weight, padding=1, groups=dim), mo.conv.bn)
                                        + bn(F.conv2d(x, mo.scale.conv.weight, groups=dim), mo.scale.bn)
                                        + bn(x, mo.skip) - bn(x, nm.skip))
    with torch.no_grad():
        train_form = mixer(x)
        mixer.reparameterize()
        folded = mixer(x)
    assert torch.allclose(train_form, expected, atol=1e-12)
    assert torch.allclose(folded, expected, atol=1e-12)
    assert mixer.reparam.kernel_size == (3, 3) and mixer.reparam.groups == dim


def test_strided_mobileone_fold():
    """A stride-2 MobileOne block (3x3 conv, 1x1 scale branch, no identity) folds exactly."""
    torch.manual_seed(0)
    block = randomize(MobileOneBlock(3, 8, 3, stride=2).double()).eval()
    assert block.skip is None and block.scale is not None
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        before = block(x)
        block.reparameterize()
        assert torch.allclose(block(x), before, atol=1e-12)


def test_reparameterizing_twice_is_an_error():
    folded = reparameterize(small_model())
    with pytest.raises(ValueError, match="already reparameterized"):
        reparameterize(folded)
    block = folded.visual.stages[0][0].token_mixer
    with pytest.raises(ValueError, match="already reparameterized"):
        block.reparameterize()
    with pytest.raises(ValueError, match="MobileCLIP"):
        reparameterize(create_model("tiny", seed=0, embed_dim=16,
                                    vision={"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "heads": 2},
                                    text={"context_length": 8, "width": 16, "layers": 1, "heads": 2}))


def test_save_and_load_both_forms(tmp_path):
    model = small_model(dtype=torch.float32)
    folded = reparameterize(model)
    images = torch.randn(2, 3, 32, 32)
    ids = clipforge.tokenize(["a red circle", "a star"], 12)
    for name, m in (("train", model), ("folded", folded)):
        save_model(m, tmp_path / name)
        loaded = load_model(tmp_path / name)
        assert isinstance(loaded, MobileCLIP) and loaded.cfg.reparameterized == (name == "folded")
        with torch.no_grad():
            assert torch.allclose(loaded.encode_image(images), m.encode_image(images), atol=1e-6)
            assert torch.allclose(loaded.encode_text(ids), m.encode_text(ids), atol=1e-6)
    with torch.no_grad():  # float32 fold: equal to rounding
        folded_loaded = load_model(tmp_path / "folded")
        assert torch.allclose(folded_loaded.encode_image(images), model.encode_image(images), atol=1e-4)
    # clipforge.load reads it too, with the MCi image size for preprocessing
    loaded, tokenizer, preprocess = clipforge.load(str(tmp_path / "folded"))
    assert isinstance(loaded, MobileCLIP) and tokenizer(["x"]).shape == (1, 12)


def test_text_tower_mixes_tokens_by_convolution():
    """MCt's first RepMixer block mixes each position with its kernel neighbours only: changing a token
    changes the first block's output within kernel // 2 positions (the convolutional token mixing)."""
    model = small_model()  # float64, O(1) layer scales
    ids = clipforge.tokenize(["a red circle left of two blue squares"], 12)
    other = ids.clone()
    other[0, 1] = 4000  # a different token at position 1
    with torch.no_grad():
        def first(i):
            x = model.text.token_embedding(i) + model.text.positional_embedding[: i.shape[1]]
            return model.text._conv_blocks(model.text.first, x)
        diff = (first(ids) - first(other)).abs().amax(-1)[0]
    k = SMALL["mct"]["kernel"] // 2
    # the ConvFFN's depthwise conv widens the reach once more: 2 * (k) positions in all
    assert (diff[: 1 + 2 * k + 1] > 0).all() and (diff[1 + 2 * k + 1:] == 0).all(), diff


def test_train_mobileclip_tiny(tiny_cfg):
    """clipforge train model=mobileclip-tiny: the loss falls; BatchNorm statistics update."""
    from clipforge.train import train

    cfg = dataclasses.replace(tiny_cfg, model="mobileclip-tiny", model_overrides=SMALL, steps=12, save_every=0)
    result = train(cfg)
    assert isinstance(result.model, MobileCLIP)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first, result.losses
    bn = result.model.visual.stem[0].conv.bn
    assert bn.num_batches_tracked > 0
