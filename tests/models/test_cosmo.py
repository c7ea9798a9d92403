"""COSMO (clipforge/models/cosmo.py) on a tiny random Llama written to disk: the split, the gated cross-attention,
the interleaved sequences, save/load and bad input, each against a reference written here."""
import math

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.errors import ConfigError, MissingInputError
from clipforge.interop.text_tokenizers import CausalLMTokenizer
from clipforge.models import create_model, save_model
from clipforge.models.cosmo import IGNORE, Cosmo, GatedCrossAttentionBlock, interleave
from tests.reference.tiny_lm import make_tiny_lm

CAPTIONS = ["a red circle .", "two small blue squares on the left", "a picture of a star"]
VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm3"), layers=3)


def _model(lm_dir, **cosmo) -> Cosmo:
    over = {"path": str(lm_dir), "layers": None, "split": 1, "heads": 4, "n_latents": 4, "context_length": 12,
            **cosmo}
    return create_model("cosmo-tiny", seed=0, embed_dim=16, vision=VISION, cosmo=over)


@pytest.mark.parametrize("split", [1, 2])
def test_text_half_is_the_lms_first_layers(lm_dir, split):
    """The text half's states equal the full LM's hidden states after its first ``split`` layers, and the text
    embedding is LN(state at the end token) P of them."""
    model = _model(lm_dir, split=split).eval()
    ids = CausalLMTokenizer(lm_dir, 12)(CAPTIONS)
    with torch.no_grad():
        got = model.text.unimodal_states(ids)
        want = model.text.lm(input_ids=ids, output_hidden_states=True).hidden_states[split]
        emb = model.encode_text(ids, normalize=False)
    assert torch.allclose(got, want, atol=1e-5)
    tower = model.text
    for b in range(len(CAPTIONS)):
        e = int((ids[b] == tower.eos_token_id).nonzero()[0])
        x = F.layer_norm(want[b, e], (want.shape[-1],), tower.ln_final.weight, tower.ln_final.bias) @ tower.proj
        assert torch.allclose(emb[b], x, atol=1e-5)


def test_closed_gates_leave_the_lm_unchanged(lm_dir):
    """With both gates at 0 (their initialization) the multimodal half's logits of an interleaved sequence are
    the LM's own logits of the same input embeddings, whatever the image."""
    model = _model(lm_dir, interleave=2).eval()
    tok = CausalLMTokenizer(lm_dir, 12)
    ids = tok(CAPTIONS[:2])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(images, ids)
        emb = model.text.decoder.embed_tokens
        rows = []
        for caption in CAPTIONS[:2]:
            toks = tok._tok(caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows += [model.media_token[None], emb(torch.tensor(toks))]
        seq = torch.cat(rows)[None]
        want = model.text.lm(inputs_embeds=seq).logits[0]
        assert torch.allclose(out["cosmo_logits"][0, : seq.shape[1]], want, atol=1e-5)
        for block in model.cross.values():  # opened gates: the image now changes the logits
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
        opened = model(images, ids)["cosmo_logits"][0, : seq.shape[1]]
        other = model(torch.randn(2, 3, 32, 32), ids)["cosmo_logits"][0, : seq.shape[1]]
    assert not torch.allclose(opened, want, atol=1e-4) and not torch.allclose(opened, other, atol=1e-4)


def test_gated_cross_attention_matches_a_naive_loop():
    """x + tanh(a_attn) XAttn(LN(x), V) masked per token, then x + tanh(a_ff) FFW(LN(x)), token by token."""
    torch.manual_seed(0)
    w, h, t, m = 8, 2, 5, 6
    block = GatedCrossAttentionBlock(w, h)
    with torch.no_grad():
        block.attn_gate.fill_(0.7)
        block.ff_gate.fill_(-0.3)
    x, media = torch.randn(1, t, w), torch.randn(1, m, w)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2 + [[1, 1, 1, 0, 0, 0]] * 3, dtype=torch.bool)[None]
    got = block(x, media, mask)
    a = block.attn
    want = []
    for i in range(t):
        xi = F.layer_norm(x[0, i], (w,), block.ln_attn.weight, block.ln_attn.bias)
        heads = []
        for k in range(h):
            sl = slice(k * w // h, (k + 1) * w // h)
            q = (a.q.weight @ xi)[sl]
            keys = [(a.kv.weight[:w] @ media[0, j])[sl] for j in range(m) if mask[0, i, j]]
            vals = [(a.kv.weight[w:] @ media[0, j])[sl] for j in range(m) if mask[0, i, j]]
            scores = torch.stack([q @ kk / math.sqrt(w // h) for kk in keys]).softmax(0)
            heads.append(sum(s * v for s, v in zip(scores, vals)))
        y = x[0, i] + math.tanh(0.7) * (a.out.weight @ torch.cat(heads))
        z = F.layer_norm(y, (w,), block.ln_ff.weight, block.ln_ff.bias)
        want.append(y + math.tanh(-0.3) * (block.ff[2].weight @ F.gelu(block.ff[0].weight @ z)))
    assert torch.allclose(got[0], torch.stack(want), atol=1e-5)


def test_interleave_builds_the_pairs_sequence_by_hand():
    eos, pad = 2, 1
    ids = torch.tensor([[5, 6, eos, pad], [7, eos, pad, pad], [8, 9, 10, eos]])
    tokens, media, slot, targets = interleave(ids, eos, pad, 2)
    assert tokens.tolist() == [[pad, 5, 6, eos, pad, 7, eos], [pad, 8, 9, 10, eos, pad, pad]]
    assert media.tolist() == [[1, 0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0]]
    assert slot.tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]]
    i = IGNORE
    assert targets.tolist() == [[5, 6, eos, i, 7, eos, i], [8, 9, 10, eos, i, i, i]]


def test_a_token_cross_attends_only_to_its_own_pairs_image(lm_dir):
    """Changing the second image changes nothing in the first pair's logits (its tokens come first and their
    cross-attention is masked to the first image); it changes the second pair's."""
    model = _model(lm_dir, interleave=2).eval()
    for block in model.cross.values():
        with torch.no_grad():
            block.attn_gate.fill_(1.0)
    ids = CausalLMTokenizer(lm_dir, 12)(CAPTIONS[:2])
    images = torch.randn(2, 3, 32, 32)
    changed = images.clone()
    changed[1] = torch.randn(3, 32, 32)
    with torch.no_grad():
        a, b = model(images, ids)["cosmo_logits"][0], model(changed, ids)["cosmo_logits"][0]
    first = 1 + int((ids[0] == 2).nonzero()[0]) + 1  # <img>, the caption and its end token
    assert torch.allclose(a[:first], b[:first], atol=1e-6)
    assert not torch.allclose(a[first:], b[first:], atol=1e-4)


def test_frozen_lm_gets_no_gradient_and_both_halves_train(lm_dir):
    model = _model(lm_dir).train()
    ids = CausalLMTokenizer(lm_dir, 12)(CAPTIONS)
    out = model(torch.randn(3, 3, 32, 32), ids)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    gen = F.cross_entropy(out["cosmo_logits"].flatten(0, 1), out["cosmo_targets"].flatten(), ignore_index=IGNORE)
    (F.cross_entropy(logits, torch.arange(3)) + gen).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.text.lm.parameters())
    assert model.text.proj.grad.abs().sum() > 0 and model.media_token.grad.abs().sum() > 0
    assert all(b.attn_gate.grad is not None and b.attn_gate.grad.abs() > 0 for b in model.cross.values())
    # at closed gates (step 0) only the gates see the generation loss; opened, the resampler does too
    assert not model.resampler.query.grad.abs().sum() > 0
    model.zero_grad()
    with torch.no_grad():
        for b in model.cross.values():
            b.attn_gate.fill_(0.1)
    out = model(torch.randn(3, 3, 32, 32), ids)
    F.cross_entropy(out["cosmo_logits"].flatten(0, 1), out["cosmo_targets"].flatten(), ignore_index=IGNORE).backward()
    assert model.resampler.query.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.visual.parameters())
    assert not model.text.lm.training
    assert 0 < model.trainable_fraction() < 1


def test_save_and_load_round_trip_without_the_lm_weights(lm_dir, tmp_path):
    from safetensors import safe_open

    model = _model(lm_dir).eval()
    with torch.no_grad():
        model.text.proj.add_(0.5)
        next(iter(model.cross.values())).attn_gate.fill_(0.3)
    save_model(model, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "text.proj" in keys and "media_token" in keys and not any(k.startswith("text.lm.") for k in keys)
    loaded, tokenizer, _ = clipforge.load(tmp_path / "m")
    assert isinstance(loaded, Cosmo) and isinstance(tokenizer, CausalLMTokenizer)
    ids, images = tokenizer(CAPTIONS), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(ids), model.encode_text(ids), atol=1e-6)
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-6)
        assert torch.allclose(loaded(images, ids)["cosmo_logits"], model(images, ids)["cosmo_logits"], atol=1e-5)


def test_bad_inputs_give_clear_errors(lm_dir, tmp_path):
    with pytest.raises(ConfigError, match="split=3 is out of range"):
        _model(lm_dir, split=3)
    with pytest.raises(ConfigError, match="split=2 is out of range"):
        _model(lm_dir, layers=2, split=2)
    with pytest.raises(ConfigError, match="cosmo.split must be >= 1"):
        _model(lm_dir, split=0)
    with pytest.raises(ConfigError, match="cosmo.heads=5 does not divide"):
        _model(lm_dir, heads=5)
    with pytest.raises(ConfigError, match="lm.path is empty"):
        create_model("cosmo-tiny")
    # a saved COSMO whose language model directory has lost its tokenizer
    bare = tmp_path / "lm"
    make_tiny_lm(bare, layers=3)
    model = _model(bare)
    save_model(model, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(MissingInputError, match="no tokenizer files"):
        clipforge.load(tmp_path / "m")
