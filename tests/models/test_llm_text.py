"""LLM2CLIP's text tower (clipforge/models/llm_text.py) on a tiny random Llama written to disk."""
import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.errors import ConfigError, MissingInputError
from clipforge.interop.text_tokenizers import CausalLMTokenizer
from clipforge.models import create_model, save_model
from clipforge.models.llm_text import LLM2CLIP, pool_states
from tests.reference.tiny_lm import make_tiny_lm

CAPTIONS = ["a red circle .", "two small blue squares on the left", "a picture of a star", "one hexagon"]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def _model(lm_dir, **lm):
    over = {"embed_dim": 16, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
            "lm": {"path": str(lm_dir), "context_length": 12, **lm}}
    return create_model("llm2clip-tiny", seed=0, **over)


def test_pool_states_match_a_loop_over_rows():
    g = torch.Generator().manual_seed(0)
    states, ends = torch.randn(3, 6, 5, generator=g), torch.tensor([0, 3, 5])
    mean, eos = pool_states(states, ends, "mean"), pool_states(states, ends, "eos")
    for b in range(3):
        e = int(ends[b])
        assert torch.allclose(mean[b], sum(states[b, i] for i in range(e + 1)) / (e + 1), atol=1e-6)
        assert torch.equal(eos[b], states[b, e])


def test_tokenizer_ends_each_row_with_eos_then_pads(lm_dir):
    tok = CausalLMTokenizer(lm_dir, 6)
    ids = tok(["a red circle", "a b c d e f g h"])  # the second is cut to 5 tokens + eos
    assert ids.shape == (2, 6)
    assert ids[0, :4].tolist()[-1] == tok.eos_token_id and (ids[0, 4:] == tok.pad_token_id).all()
    assert ids[1, -1] == tok.eos_token_id and (ids[1, :5] != tok.eos_token_id).all()


@pytest.mark.parametrize("pool", ["mean", "eos"])
def test_tower_equals_each_caption_run_alone_through_the_lm(lm_dir, pool):
    """Padding and masking change nothing: each caption run alone, unpadded, through the LM, then pooled,
    adapted and projected by hand gives the batched embedding."""
    model = _model(lm_dir, pool=pool).eval()
    tok = CausalLMTokenizer(lm_dir, 12)
    ids = tok(CAPTIONS)
    got = model.encode_text(ids, normalize=False)
    tower = model.text
    for b, caption in enumerate(CAPTIONS):
        row = tok._tok(caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            h = tower.lm(input_ids=torch.tensor([row])).last_hidden_state[0]
            x = h.mean(0) if pool == "mean" else h[-1]
            for block in tower.adapter:
                x = x + block.fc2(F.gelu(block.fc1(F.layer_norm(x, (x.shape[-1],), block.ln.weight, block.ln.bias))))
            want = F.layer_norm(x, (x.shape[-1],), tower.ln_final.weight, tower.ln_final.bias) @ tower.proj
        assert torch.allclose(got[b], want, atol=1e-5), b


def test_cache_gives_the_uncached_embeddings(lm_dir):
    cached, plain = _model(lm_dir).eval(), _model(lm_dir, cache=False).eval()
    ids = CausalLMTokenizer(lm_dir, 12)(CAPTIONS)
    first = cached.encode_text(ids)
    assert len(cached.text._cache) == len(CAPTIONS)
    calls = []
    cached.text.lm.register_forward_hook(lambda *a: calls.append(1))
    assert torch.allclose(cached.encode_text(ids[[2, 0]]), first[[2, 0]], atol=1e-6)
    assert not calls  # from the cache: the LM did not run
    assert torch.allclose(plain.encode_text(ids), first, atol=1e-6)


def test_frozen_lm_gets_no_gradient_while_adapter_and_image_tower_train(lm_dir):
    model = _model(lm_dir).train()
    ids = CausalLMTokenizer(lm_dir, 12)(CAPTIONS)
    out = model(torch.randn(4, 3, 32, 32), ids)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    F.cross_entropy(logits, torch.arange(4)).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.text.lm.parameters())
    assert model.text.proj.grad.abs().sum() > 0
    assert model.text.adapter[0].fc1.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.visual.parameters())
    assert not model.text.lm.training  # kept in eval mode


def test_save_and_load_round_trip_without_the_lm_weights(lm_dir, tmp_path):
    from safetensors import safe_open

    model = _model(lm_dir).eval()
    with torch.no_grad():
        model.text.proj.add_(0.5)  # not the seeded initialization
    save_model(model, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "text.proj" in keys and not any(k.startswith("text.lm.") for k in keys)
    loaded, tokenizer, _ = clipforge.load(tmp_path / "m")
    assert isinstance(loaded, LLM2CLIP) and isinstance(tokenizer, CausalLMTokenizer)
    ids = tokenizer(CAPTIONS)
    assert torch.allclose(loaded.encode_text(ids), model.encode_text(ids), atol=1e-6)
    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-6)


def test_first_layers_only(lm_dir):
    model = _model(lm_dir, layers=1)
    assert len(model.text.lm.layers) == 1 and model.text.lm.config.num_hidden_layers == 1
    with pytest.raises(ConfigError, match="has 2 layers"):
        _model(lm_dir, layers=3)


def test_bad_inputs_give_clear_errors(lm_dir, tmp_path):
    with pytest.raises(ConfigError, match="lm.path is empty"):
        create_model("llm2clip-tiny")
    with pytest.raises(MissingInputError, match="not a directory"):
        _model(tmp_path / "nowhere")
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(MissingInputError, match="no tokenizer files"):
        CausalLMTokenizer(bare, 8)
    model = _model(lm_dir)
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        model.encode_text(torch.full((2, 12), 5, dtype=torch.long))
    with pytest.raises(ConfigError, match="lm.pool"):
        _model(lm_dir, pool="max")
