"""Long-CLIP's knowledge-preserved stretching of the text positional embedding (Zhang et al., 2024),
against a naive loop written from the authors' code, and its effect on a clipforge model.

(Named ``test_long_clip_model.py``: ``tests/losses/test_long_clip.py`` holds the loss tests, and
pytest's default import mode needs distinct basenames in a tree without ``__init__.py`` files.)"""
import pytest
import torch

import clipforge
from clipforge.models import create_model
from clipforge.models.long_clip import LongContextConfig, stretch_context, stretch_positional_embedding


def naive_stretch(pos, keep, factor):
    """Row by row, as the Long-CLIP code writes it for factor 4 (generalized to any factor)."""
    length, dim = pos.shape
    out = torch.zeros(keep + factor * (length - keep), dim, dtype=pos.dtype)
    for i in range(keep):
        out[i] = pos[i]
    for i in range(length - 1 - keep):
        for j in range(factor):
            a, b = pos[i + keep], pos[i + 1 + keep]
            out[factor * i + j + keep] = (factor - j) / factor * a + j / factor * b
    last = out.shape[0] - factor
    for j in range(factor):
        out[last + j] = pos[length - 1] + j * (pos[length - 1] - pos[length - 2]) / factor
    return out


@pytest.mark.parametrize("length,keep,factor", [(77, 20, 4), (32, 20, 4), (10, 3, 3), (6, 0, 2)])
def test_stretch_matches_naive_loop(length, keep, factor):
    pos = torch.randn(length, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(length))
    out = stretch_positional_embedding(pos, keep, factor)
    assert out.shape == (keep + factor * (length - keep), 5)
    assert torch.equal(out[:keep], pos[:keep])  # knowledge-preserved: bit-identical
    assert torch.allclose(out, naive_stretch(pos, keep, factor), atol=1e-12)
    assert torch.equal(out[keep::factor], pos[keep:])  # every original row at keep + factor * i


def test_paper_lengths_and_bad_input():
    assert LongContextConfig().stretched_length(77) == 248
    with pytest.raises(ValueError, match="at least 2 positions"):
        stretch_positional_embedding(torch.zeros(21, 4), keep=20)
    with pytest.raises(ValueError, match="factor"):
        stretch_positional_embedding(torch.zeros(30, 4), factor=0)


@pytest.fixture(scope="module")
def small():
    return create_model(
        "tiny",
        seed=0,
        embed_dim=32,
        vision={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
        text={"context_length": 77, "width": 32, "layers": 2, "heads": 2},
    ).eval()


def test_stretched_model_keeps_short_texts_and_reads_long_ones(small):
    long_model = stretch_context(small)
    assert long_model.context_length == 248 and long_model.cfg.text.context_length == 248
    assert small.context_length == 77  # the original is untouched
    assert long_model.text.positional_embedding.shape == (248, 32)
    # a text of <= 20 tokens (start and end included) sees only kept positions: identical embedding,
    # whatever padding length it is tokenized to
    short = ["a red circle.", "two blue squares left of a star."]
    with torch.no_grad():
        before = small.encode_text(clipforge.tokenize(short, 77))
        after = long_model.encode_text(clipforge.tokenize(short, 248))
    assert torch.allclose(before, after, rtol=0, atol=1e-6)  # equal up to kernel blocking (bitwise on x86 CPU)
    # a text of 150 tokens: the 77-token model must cut it, the stretched one reads all of it, and
    # what comes after token 77 changes the embedding
    words = " ".join(["red"] * 100)
    tail_a, tail_b = clipforge.tokenize([words + " circle " * 40, words + " square " * 40], 248)
    assert int((tail_a != 0).sum()) > 77
    with torch.no_grad():
        emb = long_model.encode_text(torch.stack([tail_a, tail_b]))
    assert not torch.allclose(emb[0], emb[1])
    with pytest.raises(ValueError, match="exceeds the model's context length 77"):
        small.encode_text(tail_a[None])
    # the image tower and all text weights other than the positions are copied unchanged
    for (name, p), (_, q) in zip(small.named_parameters(), long_model.named_parameters()):
        if name != "text.positional_embedding":
            assert torch.equal(p, q), name


def test_train_option_stretches(tiny_cfg):
    import dataclasses

    from clipforge.train.setup import build_model

    cfg = dataclasses.replace(tiny_cfg, long_context_factor=4, long_context_keep=4)
    model, tokenizer = build_model(cfg)
    assert model.context_length == 4 + 4 * 12 and tokenizer.context_length == 52
    with pytest.raises(ValueError, match="long_context_factor"):
        dataclasses.replace(tiny_cfg, long_context_factor=0).validate()


def test_long_clip_training_wiring(tiny_cfg):
    """The training program feeds long_clip the longest caption and its first sentence."""
    import dataclasses

    from clipforge.data import build_dataset
    from clipforge.train import train
    from clipforge.train.data import TrainItems

    ds = build_dataset("shapes_long", split="train", size=32, seed=0, image_size=32)
    items = TrainItems(
        ds, seed=0, image_size=32, positives=1, positive_source="first_sentence", caption_policy="longest"
    )
    for i in range(8):
        it, captions = items[(0, i)], ds[i]["captions"]
        assert it["caption"] == ds[i]["long_caption"] == max(captions, key=len)
        assert it["positives"] == [captions[0].strip()]  # the summary sentence = the scene's short caption
    with pytest.raises(ValueError, match="caption_policy=longest"):
        dataclasses.replace(tiny_cfg, loss={"long_clip": 1.0}).validate()
    data = dataclasses.replace(tiny_cfg.data, dataset="shapes_long", caption_policy="longest",
                               positive_source="first_sentence", positives=1)
    cfg = dataclasses.replace(tiny_cfg, data=data, loss={"long_clip": {"weight": 1.0, "components": 4}}, steps=3,
                              save_every=0, long_context_factor=2, long_context_keep=8)
    result = train(cfg)
    assert result.step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.model.context_length == 8 + 2 * 8
