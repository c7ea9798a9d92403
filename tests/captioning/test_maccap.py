"""MacCap (Qiu et al., 2024): noise injection, sub-region aggregation, decoding and CLIP re-ranking against
naive references written here; text-only training on a tiny corpus."""
import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.captioning import (
    MacCapCaptioner,
    MacCapConfig,
    MacCapDecoder,
    noise_injection,
    region_features,
    train_maccap,
)
from clipforge.captioning.maccap import last_layer_attention

TEXTS = ["a red circle.", "two blue squares.", "a green star above a red circle."]
CFG = MacCapConfig(width=32, layers=1, heads=2, n_queries=2, align_heads=2, n_features=4, max_len=16, n_candidates=3)


@pytest.fixture(scope="module")
def trained(small_clip):
    return train_maccap(small_clip, TEXTS, CFG, steps=120, batch_size=8, lr=3e-3, seed=0, log_every=40)


def test_noise_injection_is_normalized_gaussian_perturbation():
    x = torch.randn(3, 4, 8)
    assert torch.allclose(noise_injection(x, 0.0), x / x.norm(dim=-1, keepdim=True))
    got = noise_injection(x, 0.016, torch.Generator().manual_seed(3))
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    want = x + math.sqrt(0.016) * n
    assert torch.allclose(got, want / want.norm(dim=-1, keepdim=True), atol=1e-6)


def test_last_layer_attention_matches_torch_multihead_attention(small_clip):
    images = torch.randn(2, 3, 32, 32)
    tokens, attn = last_layer_attention(small_clip, images)
    assert torch.allclose(tokens, small_clip.visual.forward_tokens(images), atol=1e-6)
    # the last block's input, recomputed by hand, fed to torch's MultiheadAttention with the same weights
    v = small_clip.visual
    x = v.embed_patches(images)
    x = torch.cat([v.class_embedding.expand(2, 1, -1), x], dim=1) + v.positional_embedding
    x = v.ln_pre(x)
    for block in v.transformer.blocks[:-1]:
        x = block(x)
    last = v.transformer.blocks[-1]
    mha = torch.nn.MultiheadAttention(32, last.attn.heads, batch_first=True)
    mha.in_proj_weight.data.copy_(last.attn.in_proj.weight)
    mha.in_proj_bias.data.copy_(last.attn.in_proj.bias)
    h = last.ln_1(x)
    _, want = mha(h, h, h, need_weights=True, average_attn_weights=True)
    assert torch.allclose(attn, want, atol=1e-5)


@pytest.mark.parametrize("weights", ["softmax", "attention"])
def test_region_features_match_naive_loop(small_clip, weights):
    images = torch.randn(3, 3, 32, 32)
    k, lam = 4, 0.7
    v, f = region_features(small_clip, images, k, lam, weights)
    tokens, attn = last_layer_attention(small_clip, images)
    with torch.no_grad():
        emb = small_clip.encode_image(images)
    for b in range(3):
        proj = [F.normalize(small_clip.visual.project(tokens[b, j]), dim=-1) for j in range(tokens.shape[1])]
        order = sorted(range(attn.shape[-1]), key=lambda j: -attn[b, 0, j].item())[:k]
        assert torch.allclose(v[b], F.normalize(emb[b], dim=-1), atol=1e-5)
        for slot, i in enumerate(order):
            row = attn[b, i]
            w = torch.exp(row) / torch.exp(row).sum() if weights == "softmax" else row
            r = sum(w[j] * proj[j] for j in range(len(proj)))
            assert torch.allclose(f[b, slot], v[b] + lam * r / r.norm(), atol=1e-5)


def test_region_features_need_a_class_token():
    from clipforge.models import create_model

    vision = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, "class_token": False,
              "pool": "mean"}
    m = create_model("tiny", embed_dim=32, vision=vision,
                     text={"context_length": 16, "width": 32, "layers": 1, "heads": 2})
    with pytest.raises(ValueError, match="class token"):
        region_features(m, torch.randn(1, 3, 32, 32), 4)


def test_greedy_batched_equals_per_image_argmax_loop():
    torch.manual_seed(0)
    dec = MacCapDecoder(MacCapConfig(width=16, layers=1, heads=2, n_queries=2, align_heads=2, max_len=8), 8,
                        [0, 49406, 49407, 320, 321, 322]).eval()
    with torch.no_grad():
        dec.head.weight.mul_(20)  # sharp, varied distributions so that end tokens come at different steps
        prefix = dec.prefix(torch.randn(5, 3, 8))
        got = dec.greedy(prefix)
    for b in range(5):
        ids = [1]
        while len(ids) < 8 and ids[-1] != 2:
            with torch.no_grad():
                logits = dec.logits(prefix[b : b + 1], torch.tensor([ids]))[0, -1]
            logits[[0, 1]] = -float("inf")
            ids.append(int(logits.argmax()))
        row = got[b].tolist()
        assert row[: len(ids)] == ids and all(t == 0 for t in row[len(ids):])


def test_text_only_training_learns_the_captions(small_clip, trained):
    cap, history = trained
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    # from its own (noise-free) text embedding, the decoder writes each training caption back
    with torch.no_grad():
        t = F.normalize(small_clip.encode_text(cap.tokenizer(TEXTS)), dim=-1)
        ids = cap.decoder.greedy(cap.decoder.prefix(t.unsqueeze(1).expand(-1, CFG.n_features, -1)))
    got = [s.replace(" .", ".") for s in cap.decode(ids)]
    assert got == TEXTS


def test_caption_reranks_candidates_by_clip_cosine(trained):
    cap, _ = trained
    images = torch.randn(2, 3, 32, 32)
    v, cands = cap.candidates(images, torch.Generator().manual_seed(7))
    recs = cap.caption(images, torch.Generator().manual_seed(7))
    for i in range(2):
        assert recs[i]["candidates"] == cands[i] and len(cands[i]) == CFG.n_candidates
        with torch.no_grad():
            t = cap.clip.encode_text(cap.tokenizer(cands[i]))
        sims = [F.cosine_similarity(t[j], v[i], dim=0).item() for j in range(len(cands[i]))]
        best = max(range(len(sims)), key=lambda j: sims[j])
        assert recs[i]["caption"] == cands[i][best]
        assert recs[i]["clip_cosine"] == pytest.approx(sims[best], abs=1e-5)


def test_save_load_roundtrip(tmp_path, trained):
    cap, _ = trained
    images = torch.randn(2, 3, 32, 32)
    cap.save(tmp_path / "mc")
    back = MacCapCaptioner.load(tmp_path / "mc")
    a = cap.caption(images, torch.Generator().manual_seed(1))
    b = back.caption(images, torch.Generator().manual_seed(1))
    assert a == b
    with pytest.raises(FileNotFoundError, match="not a MacCap decoder directory"):
        MacCapCaptioner.load(tmp_path)


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="region_weights"):
        MacCapConfig(region_weights="max")
    with pytest.raises(ValueError, match="divisible"):
        MacCapConfig(width=30, heads=4)
