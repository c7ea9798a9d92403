"""The text tower's token-embedding seam: feeding the lookup's own output changes nothing."""
import pytest
import torch


@pytest.mark.parametrize(
    "text", [{}, {"causal": False, "pad_mask": True}, {"causal": False, "pad_mask": False, "pool": "mean"}]
)
def test_embeddings_input_equals_ids_input(text, tokenizer, make_model):
    model = make_model(seed=1, **text)
    ids = tokenizer(["a picture of a circle.", "two red squares to the left of a star", "x"])
    with torch.no_grad():
        ref = model.encode_text(ids)
        emb = model.text.token_embedding(ids)
        out = model.encode_text(ids, embeddings=emb)
        raw = model.encode_text(ids, normalize=False, embeddings=emb)
    assert torch.equal(out, ref)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), ref, atol=1e-6)
    # the embeddings really are what the tower reads: changing one content position changes that text only
    emb2 = emb.clone()
    emb2[0, 2] += torch.randn(
        emb.shape[-1], generator=torch.Generator().manual_seed(0)
    )  # not a constant: LayerNorm removes those
    with torch.no_grad():
        moved = model.encode_text(ids, embeddings=emb2)
    assert not torch.allclose(moved[0], ref[0], atol=1e-4)
    assert torch.equal(moved[1:], ref[1:])


def test_embeddings_of_the_wrong_shape_are_refused(small_model, tokenizer):
    ids = tokenizer(["a circle"])
    with pytest.raises(ValueError, match="do not match"):
        small_model.encode_text(ids, embeddings=torch.zeros(1, ids.shape[1], 7))
