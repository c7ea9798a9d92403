"""Packed text inference (clipforge.models.packed_text) computes what the padded training path computes.

The reference is the training path itself, independent of any trimming: every text run alone through the whole
padded sequence (context length 24) and pooled at its end-of-text token. In float64 the packed batch must equal it
up to summation order, whatever the mix of lengths, buckets and given token embeddings. Speed is measured by
benchmarks/bench_inference.py, not asserted here.
"""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from test_inference import SMALL, _ids, _padded_reference

from clipforge.models import create_model, packed_text
from clipforge.models.packed_text import PackedTextTransformer, pack_text_towers, packable, unpack_text_towers
from clipforge.models.text import BUCKET_ROWS, TextTransformer


def _one_by_one(model, ids, embeddings=None):
    """Each text alone through the full padded pass: the reference no batching or trimming can touch."""
    with torch.no_grad():
        return torch.cat([_padded_reference(model, ids[i : i + 1],
                                            None if embeddings is None else embeddings[i : i + 1])
                          for i in range(ids.shape[0])])


@pytest.mark.parametrize("batch", [2, 7, BUCKET_ROWS, 2 * BUCKET_ROWS + 37])
@pytest.mark.parametrize("pack_rows", [packed_text.PACK_ROWS, 40])
def test_packed_text_forward_equals_each_text_alone_through_the_padded_pass_in_float64(batch, pack_rows,
                                                                                         monkeypatch):
    monkeypatch.setattr(packed_text, "PACK_ROWS", pack_rows)  # 40: groups of a few texts, one text alone at times
    model = create_model("tiny", **SMALL, seed=0).to_inference(torch.float64)
    assert type(model.text) is PackedTextTransformer
    ids = _ids(batch, seed=batch)
    ids[-1] = torch.arange(1, 25)  # no end-of-text token: pooled at the last position, nothing cut
    emb = torch.randn(batch, 24, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        assert model.text.trims(ids)
        torch.testing.assert_close(model.text(ids), _one_by_one(model, ids), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.text(ids, emb), _one_by_one(model, ids, emb), rtol=1e-10, atol=1e-12)


def test_rows_past_a_texts_end_do_not_leak_into_other_texts():
    """Two texts whose padding differs wildly (garbage ids after the end-of-text token) give the embeddings
    they give alone, and a batch in another order gives the same rows, permuted."""
    model = create_model("tiny", **SMALL, seed=3).to_inference(torch.float64)
    ids = _ids(2 * BUCKET_ROWS + 5, seed=11)
    noisy = ids.clone()
    after_end = torch.arange(24)[None, :] > ids.argmax(dim=1)[:, None]
    noisy[after_end] = torch.randint(1, 98, (int(after_end.sum()),), generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.text(ids)
        torch.testing.assert_close(model.text(noisy), out, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.text(ids[perm]), out[perm], rtol=1e-10, atol=1e-12)


def test_bf16_packed_texts_agree_with_the_bucketed_path():
    model = create_model("tiny", **SMALL, seed=4).to_inference("bf16")
    ids = _ids(3 * BUCKET_ROWS, seed=4)
    with torch.no_grad():
        packed = model.encode_text(ids)
        assert unpack_text_towers(model) == 1 and type(model.text) is TextTransformer
        bucketed = model.encode_text(ids)
        reference = F.normalize(_one_by_one(create_model("tiny", **SMALL, seed=4).double().eval(), ids), dim=-1)
    assert F.cosine_similarity(packed.double(), bucketed.double()).min() > 0.999
    assert F.cosine_similarity(packed.double(), reference).min() > 0.99


def test_packing_keeps_the_state_dict_and_survives_copies():
    model = create_model("tiny", **SMALL, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.to_inference(torch.float64)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k].double(), after[k]) for k in before)
    ids = _ids(9, seed=5)
    with torch.no_grad():
        out = model.encode_text(ids)
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert type(twin.text) is PackedTextTransformer
            torch.testing.assert_close(twin.encode_text(ids), out, rtol=0, atol=0)
    assert unpack_text_towers(model) == 1 and pack_text_towers(model) == 1


def test_only_plain_causal_towers_are_packed_and_gradients_take_the_padded_path():
    bidirectional = create_model("tiny", **{**SMALL, "text": {**SMALL["text"], "causal": False}}, seed=0)
    assert not packable(bidirectional.text) and pack_text_towers(bidirectional) == 0
    mean_pooled = create_model("tiny", **{**SMALL, "text": {**SMALL["text"], "pool": "mean"}}, seed=0)
    assert pack_text_towers(mean_pooled) == 0
    from clipforge.models.moe import upcycle

    moe = upcycle(create_model("tiny", **SMALL, seed=0), experts=2, top_k=1, towers=("text",))
    assert pack_text_towers(moe) == 0  # its routing reads every position (trim_padding off)
    model = create_model("tiny", **SMALL, seed=0).double()
    assert pack_text_towers(model) == 1
    ids = _ids(6, seed=6)
    features = model.text(ids)  # gradients on: the padded training path, gradients flow
    features.sum().backward()
    assert model.text.token_embedding.weight.grad is not None
    torch.testing.assert_close(features.detach(), _one_by_one(model, ids), rtol=1e-10, atol=1e-12)


def test_groups_hold_at_most_the_row_budget_and_a_long_text_alone():
    assert packed_text._groups([5, 4, 3, 3], 8) == [(0, 1), (1, 3), (3, 4)]
    assert packed_text._groups([10, 2], 8) == [(0, 1), (1, 2)]  # a text over the budget still runs, alone
    assert packed_text._groups([3, 3, 2], 8) == [(0, 3)]


def test_bad_shapes_get_the_padded_paths_messages():
    model = create_model("tiny", **SMALL, seed=0).to_inference(torch.float64)
    with torch.no_grad(), pytest.raises(ValueError, match="exceeds the model's context length 24"):
        ids = torch.cat([_ids(3, seed=0), torch.zeros(3, 2, dtype=torch.long)], dim=1)
        ids[0] = torch.arange(1, 27)  # 26 tokens and no end-of-text token: longer than the context
        model.text(ids)
    with torch.no_grad(), pytest.raises(ValueError, match="do not match ids"):
        model.text(_ids(3, seed=0), torch.zeros(3, 24, 16, dtype=torch.float64))
