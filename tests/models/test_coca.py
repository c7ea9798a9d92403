"""CoCa (Yu et al., 2022): output shapes, the decoder's causal mask, its use of the image,
training through clipforge train with {clip, caption}, greedy and beam decoding, save/load."""
import dataclasses
import math

import pytest
import torch

import clipforge
from clipforge.losses import caption_loss
from clipforge.models import CoCa, CoCaConfig, create_model, get_model_config, load_model, save_model

EOT, SOT = 49407, 49406




SMALL = dict(embed_dim=32, vision={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
             text={"context_length": 16, "width": 32, "layers": 1, "heads": 2},
             multimodal={"layers": 2, "heads": 2, "n_queries": 6, "pool_heads": 2})


@pytest.fixture(scope="module")
def model():
    return create_model("coca-tiny", seed=0, **SMALL).eval()


def images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_config_and_shapes(model):
    cfg = get_model_config("coca-tiny")
    assert isinstance(cfg, CoCaConfig) and cfg.multimodal.layers == 2 and cfg.multimodal.n_queries == 32
    assert isinstance(model, CoCa) and isinstance(model, clipforge.models.CLIP)
    ids = clipforge.tokenize(["a red circle.", "two blue squares left of a large green star.", ""], 16)
    with torch.no_grad():
        out = model(images(3), ids)
    n = int((ids == EOT).float().argmax(1).max()) + 1  # the longest caption, start and end included
    assert out["caption_logits"].shape == (3, n - 1, 49408)
    assert torch.equal(out["caption_targets"], ids[:, 1:n])
    assert out["image_features"].shape == out["text_features"].shape == (3, 32)
    # the contrastive embeddings are the CLIP towers' own
    with torch.no_grad():
        assert torch.allclose(out["image_features"], model.encode_image(images(3)), atol=1e-6)
        assert torch.allclose(out["text_features"], model.encode_text(ids), atol=1e-6)
    # truncating after the longest caption loses nothing: the dropped targets are all padding
    with torch.no_grad():
        full = model.caption_logits(model.image_and_caption_tokens(images(3))[1], ids[:, :-1])
    assert torch.allclose(full[:, : n - 1], out["caption_logits"], atol=1e-5)
    assert (ids[:, n:] == 0).all()
    assert torch.isclose(caption_loss(full, ids[:, 1:]), caption_loss(out["caption_logits"], out["caption_targets"]),
                         atol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        CoCaConfig.from_dict({**get_model_config("coca-tiny").to_dict(), "text": {"causal": False}})


def test_causal_mask(model):
    """The logit at position l depends on tokens <= l only."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 49000, (2, 10), generator=g)
    changed = ids.clone()
    changed[:, 6:] = torch.randint(1, 49000, (2, 4), generator=g)
    with torch.no_grad():
        memory = model.image_and_caption_tokens(images(2))[1]
        a, b = model.caption_logits(memory, ids), model.caption_logits(memory, changed)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-5)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_cross_attention_uses_the_image(model):
    ids = clipforge.tokenize(["a red circle.", "a blue star."], 16)
    with torch.no_grad():
        a = model(images(2, seed=0), ids)["caption_logits"]
        b = model(images(2, seed=1), ids)["caption_logits"]
    assert (a - b).abs().max() > 1e-3
    # ... through the pooled image tokens: zeroing the cross-attention output projections makes it blind
    blind = create_model("coca-tiny", seed=0, **SMALL).eval()
    with torch.no_grad():
        for cross in blind.decoder.cross:
            cross.attn.out_proj.weight.zero_()
            cross.attn.out_proj.bias.zero_()
        assert torch.allclose(blind(images(2, 0), ids)["caption_logits"], blind(images(2, 1), ids)["caption_logits"])


def test_generate(model):
    x = images(3)
    greedy = model.generate(x, max_len=12)
    assert greedy.dtype == torch.long and greedy.shape[0] == 3 and greedy.shape[1] <= 12
    assert (greedy[:, 0] == SOT).all() and ((greedy >= 0) & (greedy < 49408)).all()
    for row in greedy:
        ends = (row == EOT).nonzero()
        if len(ends):  # after the end token only padding
            assert (row[int(ends[0]) + 1:] == 0).all()
        assert not (row[1:] == SOT).any()
    # greedy: each token is the argmax of the decoder given the prefix
    with torch.no_grad():
        memory = model.image_and_caption_tokens(x)[1]
        logits = model.caption_logits(memory[:1], greedy[:1, :4])[0]
    logits[:, [SOT, 0]] = -torch.inf
    assert torch.equal(logits[:3].argmax(-1), greedy[0, 1:4])
    # one beam is greedy; more beams return valid sequences of the same form
    assert torch.equal(model.generate(x, max_len=12, num_beams=1), greedy)
    beam = model.generate(x, max_len=12, num_beams=3)
    assert beam.shape[0] == 3 and (beam[:, 0] == SOT).all()
    # a decoder that always prefers the end token stops after one step
    eager = create_model("coca-tiny", seed=0, **SMALL).eval()
    with torch.no_grad():
        eager.decoder.head.weight.zero_()
        eager.decoder.head.weight[EOT] = 0.0
        eager.decoder.ln_final.bias.zero_()
        eager.decoder.ln_final.weight.zero_()
        eager.decoder.ln_final.bias[0] = 1.0
        eager.decoder.head.weight[EOT, 0] = 10.0
    for k in (1, 2):
        assert torch.equal(eager.generate(x, max_len=12, num_beams=k), torch.tensor([[SOT, EOT]] * 3))


def test_save_load_roundtrip(model, tmp_path):
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, CoCa)
    for (k, v), (_, w) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(v, w), k


def test_training_lowers_the_caption_loss(tiny_cfg):
    """clipforge train model=coca-tiny loss={clip: 1, caption: 2} on shapes; the caption loss falls."""
    from clipforge.train import train

    cfg = dataclasses.replace(tiny_cfg, model="coca-tiny", model_overrides=SMALL, loss={"clip": 1.0, "caption": 2.0},
                              steps=25, save_every=0, log_every=1, lr=3e-3)
    result = train(cfg)
    import json
    from pathlib import Path

    caption = [json.loads(l)["caption"] for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()
               if "caption" in l]
    assert len(caption) == 25 and isinstance(result.model, CoCa)
    first, last = sum(caption[:5]) / 5, sum(caption[-5:]) / 5
    assert last < 0.8 * first and last < math.log(49408) - 2.5, caption  # uniform guessing costs log V = 10.8
    # a plain CLIP cannot feed the caption loss; CoCa cannot accumulate it over micro-batches
    with pytest.raises(ValueError, match="caption_logits.*coca-tiny"):
        train(dataclasses.replace(tiny_cfg, loss={"clip": 1.0, "caption": 2.0}))
    with pytest.raises(ValueError, match="accum_steps=1"):
        train(dataclasses.replace(cfg, accum_steps=2))
