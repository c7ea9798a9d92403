"""The attention maps written out for GA-DMS: Attention.forward_with_weights against forward and a per-head softmax
written here, and CLIP.encode_text_attention against encode_text and the text tower's own last block."""
import pytest
import torch

from clipforge.models.transformer import Attention


def _naive_weights(attn: Attention, x: torch.Tensor, causal: bool, keep: torch.Tensor | None) -> torch.Tensor:
    """softmax_j(q_i . k_j / sqrt(d)) per sample and head, with loops, from the fused projection's weights."""
    b, n, c = x.shape
    h, d = attn.heads, c // attn.heads
    w, bias = attn.in_proj.weight, attn.in_proj.bias
    out = torch.zeros(b, h, n, n, dtype=x.dtype)
    for s in range(b):
        for head in range(h):
            q = x[s] @ w[head * d:(head + 1) * d].t() + bias[head * d:(head + 1) * d]
            k = x[s] @ w[c + head * d:c + (head + 1) * d].t() + bias[c + head * d:c + (head + 1) * d]
            for i in range(n):
                allowed = [j for j in range(n) if (not causal or j <= i) and (keep is None or bool(keep[s, j]))]
                logits = torch.stack([q[i] @ k[j] / d**0.5 for j in allowed])
                out[s, head, i, allowed] = torch.softmax(logits, 0)
    return out


@pytest.mark.parametrize("causal,masked", [(True, False), (False, True), (False, False)])
def test_forward_with_weights_matches_forward_and_a_naive_softmax(causal, masked):
    torch.manual_seed(0)
    attn = Attention(8, 2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    keep = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]]) if masked else None
    mask = keep[:, None, None, :] if masked else None
    out, weights = attn.forward_with_weights(x, attn_mask=mask, is_causal=causal)
    assert torch.allclose(out, attn(x, attn_mask=mask, is_causal=causal), atol=1e-12)
    assert torch.allclose(weights, _naive_weights(attn, x, causal, keep), atol=1e-12)
    with pytest.raises(ValueError, match="boolean attn_mask"):
        attn.forward_with_weights(x, attn_mask=torch.zeros(2, 1, 1, 5))


def test_encode_text_attention_is_encode_text_with_the_last_blocks_attention_in_the_graph():
    import clipforge
    from clipforge.tokenizer import get_tokenizer

    model = clipforge.create_model("tiny", seed=0, embed_dim=16, vision={"image_size": 32, "patch_size": 8,
                                   "width": 16, "layers": 1, "heads": 2},
                                   text={"context_length": 16, "width": 16, "layers": 2, "heads": 2}).double()
    ids = get_tokenizer(16)(["a small red circle.", "two blue squares left of a star."])
    text, weights = model.encode_text_attention(ids)
    assert torch.allclose(text, model.encode_text(ids), atol=1e-12)
    tower = model.text
    x = tower.token_embedding(ids) + tower.positional_embedding[:16]
    x = tower.transformer.blocks[0](x, is_causal=True)
    want = _naive_weights(tower.transformer.blocks[1].attn, tower.transformer.blocks[1].ln_1(x), True, None)
    assert torch.allclose(weights, want, atol=1e-12)
    (grad,) = torch.autograd.grad(text[:, 0].sum(), weights)  # the attention maps are nodes of the graph
    assert grad.abs().sum() > 0
