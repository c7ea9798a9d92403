"""SCST with a CLIP-S reward: the policy-gradient loss and the sequence log-probs against naive loops,
and single updates of the CoCa and MacCap policies (only their captioning parameters move)."""
import math

import pytest
import torch

from clipforge.captioning import (
    CoCaPolicy,
    MacCapConfig,
    MacCapPolicy,
    frozen_judge,
    scst_loss,
    scst_step,
    train_maccap,
)
from clipforge.captioning.scst import clip_s_reward, decode, sequence_logprobs
from clipforge.models import create_model


def test_scst_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]).bool()
    r_s, r_g = torch.tensor([0.9, 0.2, 0.5, 0.0]), torch.tensor([0.4, 0.6, 0.5, 0.3])
    want = 0.0
    for b in range(4):
        total = sum(logp[b, t].item() for t in range(6) if mask[b, t])
        want += -(r_s[b].item() - r_g[b].item()) * total
    assert scst_loss(logp, mask, r_s, r_g).item() == pytest.approx(want / 4, rel=1e-6)
    # the reward is a constant: the gradient w.r.t. the log-probs is -(r_s - r_g) / B on counted tokens
    x = logp.clone().requires_grad_(True)
    scst_loss(x, mask, r_s.requires_grad_(True), r_g).backward()
    assert torch.allclose(x.grad, -((r_s - r_g).detach() / 4)[:, None] * mask)


@pytest.fixture(scope="module")
def coca(small_overrides):
    mm = {"layers": 1, "heads": 2, "n_queries": 4, "pool_heads": 2}
    return create_model("coca-tiny", seed=0, **small_overrides, multimodal=mm)


def test_sequence_logprobs_match_per_step_loop(coca):
    policy = CoCaPolicy(coca)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ctx = policy.context(images)
        ids = decode(policy, ctx, 7, greedy=False, generator=torch.Generator().manual_seed(1))
        got, mask = sequence_logprobs(policy, ctx, ids)
    for b in range(3):
        for t in range(1, ids.shape[1]):
            if ids[b, t] == policy.pad:
                assert not mask[b, t - 1] and got[b, t - 1] == 0
                continue
            with torch.no_grad():
                logits = coca.caption_logits(ctx[b : b + 1], ids[b : b + 1, :t])[0, -1].float()
            logits[[policy.sot, policy.pad]] = -float("inf")
            want = logits[ids[b, t]] - torch.logsumexp(logits, 0)
            assert mask[b, t - 1] and got[b, t - 1].item() == pytest.approx(want.item(), abs=1e-4)


def test_clip_s_reward_is_clip_s_of_the_texts(coca):
    judge = frozen_judge(coca)
    images = torch.randn(2, 3, 32, 32)
    r = clip_s_reward(judge, images, ["a red circle.", "two blue squares."])
    with torch.no_grad():
        from clipforge.tokenizer import get_tokenizer

        t = judge.encode_text(get_tokenizer(16)(["a red circle.", "two blue squares."]))
        v = judge.encode_image(images)
    for i in range(2):
        cos = (t[i] @ v[i] / (t[i].norm() * v[i].norm())).item()
        assert r[i].item() == pytest.approx(2.5 * max(cos, 0.0), abs=1e-5)


def test_coca_scst_step_moves_only_the_captioning_half(coca):
    judge = frozen_judge(coca)
    policy = CoCaPolicy(coca)
    before = {k: v.clone() for k, v in coca.state_dict().items()}
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    out = scst_step(policy, judge, torch.randn(4, 3, 32, 32), opt, max_len=6,
                    generator=torch.Generator().manual_seed(0))
    assert math.isfinite(out["loss"]) and 0 <= out["reward_sample"] <= 2.5
    changed = {k for k, v in coca.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("decoder.", "attn_pool_caption.", "ln_caption.")) for k in changed)


def test_maccap_scst_step_moves_only_the_decoder(small_clip):
    cfg = MacCapConfig(width=16, layers=1, heads=2, n_queries=2, align_heads=2, n_features=3, max_len=8)
    cap, _ = train_maccap(small_clip, ["a red circle.", "two blue squares."], cfg, steps=2, batch_size=4)
    clip_before = {k: v.clone() for k, v in cap.clip.state_dict().items()}
    dec_before = {k: v.clone() for k, v in cap.decoder.state_dict().items()}
    policy = MacCapPolicy(cap)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    judge = frozen_judge(cap.clip)
    for seed in range(3):  # three batches: some sampled caption differs from the greedy one in reward
        scst_step(policy, judge, torch.randn(4, 3, 32, 32), opt, generator=torch.Generator().manual_seed(seed))
    assert all(torch.equal(v, clip_before[k]) for k, v in cap.clip.state_dict().items())
    assert any(not torch.equal(v, dec_before[k]) for k, v in cap.decoder.state_dict().items())
