"""The inference fast paths compute what the training path computes.

The text tower without gradients runs each text only up to its end-of-text token (one cut for a
small batch, length buckets for a large one); it must give each text the embedding that the full
padded pass gives it, in float64 up to summation order. ``CLIP.to_inference`` casts the weights
once; in float64 it must equal the untouched model, in bf16 stay close to float32. Speed is
measured by benchmarks/bench_inference.py, not asserted here.
"""
import pytest
import torch
import torch.nn.functional as F

from clipforge.errors import ConfigError
from clipforge.models import create_model
from clipforge.models.text import BUCKET_ROWS

SMALL = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
         "text": {"context_length": 24, "width": 32, "layers": 2, "heads": 2, "vocab_size": 100,
                  "eot_token_id": 99}}


def _ids(n: int, seed: int, ctx: int = 24, eot: int = 99) -> torch.Tensor:
    """Token ids like the tokenizer's: start token, words, end-of-text, zero padding; lengths vary 2..ctx."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, ctx, dtype=torch.long)
    lengths = torch.randint(2, ctx + 1, (n,), generator=g)
    for i, length in enumerate(lengths.tolist()):
        ids[i, 0] = 98
        ids[i, 1 : length - 1] = torch.randint(1, 98, (length - 2,), generator=g)
        ids[i, length - 1] = eot
    return ids


def _padded_reference(model, ids, embeddings=None):
    """The training path: the whole padded sequence, pooled at the end-of-text token."""
    text = model.text
    return text.project(text.pool(text.forward_tokens(ids, embeddings), ids))


@pytest.mark.parametrize("batch", [1, 7, 2 * BUCKET_ROWS + 37])
def test_trimmed_text_forward_equals_the_padded_pass_in_float64(batch):
    model = create_model("tiny", **SMALL, seed=0).double().eval()
    ids = _ids(batch, seed=batch)
    with torch.no_grad():
        assert model.text.trims(ids)
        fast = model.text(ids)
        ref = _padded_reference(model, ids)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)


def test_bucketed_batch_keeps_each_text_in_its_row():
    model = create_model("tiny", **SMALL, seed=1).double().eval()
    ids = _ids(3 * BUCKET_ROWS, seed=3)
    with torch.no_grad():
        batch = model.text(ids)
        one_by_one = torch.cat([_padded_reference(model, ids[i : i + 1]) for i in range(ids.shape[0])])
    torch.testing.assert_close(batch, one_by_one, rtol=1e-10, atol=1e-12)


def test_texts_without_an_end_of_text_token_and_given_embeddings_are_trimmed_correctly():
    model = create_model("tiny", **SMALL, seed=2).double().eval()
    ids = _ids(5, seed=5)
    ids[0] = torch.arange(1, 25)  # no end-of-text token: pooled at the last position, nothing cut
    emb = torch.randn(5, 24, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.text(ids), _padded_reference(model, ids), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.text(ids, emb), _padded_reference(model, ids, emb), rtol=1e-10, atol=1e-12)


def test_gradients_and_non_causal_towers_take_the_padded_path():
    model = create_model("tiny", **SMALL, seed=0)
    ids = _ids(4, seed=0)
    assert not model.text.trims(ids)  # gradients on
    with torch.no_grad():
        assert model.text.trims(ids)
        bidir = create_model("tiny", **{**SMALL, "text": {**SMALL["text"], "causal": False}}, seed=0)
        assert not bidir.text.trims(ids)  # padding keys are masked, but every position is read


def test_to_inference_in_float64_equals_the_model_and_bf16_stays_close():
    ref_model = create_model("tiny", **SMALL, seed=0).double().eval()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    ids = _ids(3, seed=1)
    with torch.no_grad():
        ref_i = F.normalize(ref_model.visual(images), dim=-1)
        ref_t = F.normalize(_padded_reference(ref_model, ids), dim=-1)
    fast = create_model("tiny", **SMALL, seed=0).to_inference(torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast.encode_image(images), ref_i, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fast.encode_text(ids), ref_t, rtol=1e-10, atol=1e-12)
    bf16 = create_model("tiny", **SMALL, seed=0).to_inference("bf16")
    assert bf16.visual.patch_embed.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in bf16.parameters())
    with torch.no_grad():
        out_i, out_t = bf16.encode_image(images.float()), bf16.encode_text(ids)
    assert out_i.dtype == out_t.dtype == torch.float32  # embeddings come back in float32
    assert F.cosine_similarity(out_i.double(), ref_i).min() > 0.99
    assert F.cosine_similarity(out_t.double(), ref_t).min() > 0.99


def test_an_inference_model_refuses_training_and_bad_dtypes_are_named():
    model = create_model("tiny", **SMALL, seed=0).to_inference("bf16")
    model.eval()  # allowed
    with pytest.raises(ConfigError, match="to_inference"):
        model.train()
    with pytest.raises(ConfigError, match="unknown inference dtype 'int8'"):
        create_model("tiny", **SMALL, seed=0).to_inference("int8")


def test_moe_text_tower_keeps_every_position_for_its_routing():
    from clipforge.models.moe import upcycle

    moe = upcycle(create_model("tiny", **SMALL, seed=0), experts=2, top_k=1, towers=("text",))
    with torch.no_grad():
        assert not moe.text.trims(_ids(2, seed=0))
