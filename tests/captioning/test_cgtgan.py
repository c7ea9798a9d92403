"""CgT-GAN (clipforge.captioning.cgtgan): CLIP-cos and CLIP-agg rewards and the discriminator's loss against naive
loops written from the paper's definitions, and one adversarial step that moves the generator and the
discriminator but not the judge."""
import copy
import math

import pytest
import torch

from clipforge.captioning.cgtgan import (
    CaptionDiscriminator,
    CgTGAN,
    clip_agg_reward,
    clip_cos_reward,
    discriminator_loss,
)

CORPUS = ["a red circle", "two blue squares", "a green triangle above a star", "three yellow stars"]


def _norm(x):
    n = math.sqrt(sum(a * a for a in x))
    return [a / n for a in x]


def _cos(a, b):
    return sum(x * y for x, y in zip(_norm(a), _norm(b)))


def test_clip_cos_reward_is_the_pairwise_cosine():
    g = torch.Generator().manual_seed(0)
    t, v = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    naive = [_cos(t[i].tolist(), v[i].tolist()) for i in range(5)]
    assert clip_cos_reward(t, v).tolist() == pytest.approx(naive, abs=1e-6)


def test_clip_agg_reward_matches_a_loop_over_the_corpus():
    g = torch.Generator().manual_seed(1)
    t, v, s = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g), torch.randn(8, 6, generator=g)
    tau = 0.1
    for i in range(3):
        sims = [_cos(v[i].tolist(), s[j].tolist()) / tau for j in range(8)]
        top = max(sims)
        w = [math.exp(x - top) for x in sims]
        w = [x / sum(w) for x in w]
        unit = [_norm(s[j].tolist()) for j in range(8)]
        agg = [sum(w[j] * unit[j][d] for j in range(8)) for d in range(6)]
        assert float(clip_agg_reward(t[i:i + 1], v[i:i + 1], s, tau)) == pytest.approx(_cos(t[i].tolist(), agg),
                                                                                       abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        clip_agg_reward(t, v, s, 0.0)


def test_discriminator_loss_is_bce_real_one_fake_zero():
    real, fake = torch.tensor([1.5, -0.2]), torch.tensor([0.4, -2.0, 0.0])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    naive = -(sum(math.log(sig(float(r))) for r in real) + sum(math.log(1 - sig(float(f))) for f in fake)) / 5
    assert float(discriminator_loss(real, fake)) == pytest.approx(naive, rel=1e-6)


def test_discriminator_reads_up_to_the_last_real_token():
    d = CaptionDiscriminator(vocab_size=50, width=8)
    ids = torch.tensor([[3, 4, 5, 0, 0], [3, 4, 5, 9, 9]])
    padded_more = torch.tensor([[3, 4, 5, 0, 0, 0, 0]])
    assert torch.allclose(d(ids)[0], d(padded_more)[0])
    assert not torch.allclose(d(ids)[0], d(ids)[1])


@pytest.mark.parametrize("reward", ["cos", "agg"])
def test_adversarial_step_moves_generator_and_discriminator_not_the_judge(small_clip, reward):
    from clipforge.captioning import MacCapConfig, MacCapPolicy, frozen_judge, train_maccap

    cfg = MacCapConfig(width=16, layers=1, heads=2, n_queries=2, align_heads=2, n_features=3, max_len=8)
    cap, _ = train_maccap(copy.deepcopy(small_clip), CORPUS, cfg, steps=2, batch_size=4)
    policy, judge = MacCapPolicy(cap), frozen_judge(cap.clip)
    disc = CaptionDiscriminator(width=16)
    gan = CgTGAN(policy, judge, disc, reward=reward, lam=0.5, corpus=CORPUS)
    judge_before = {k: v.clone() for k, v in judge.state_dict().items()}
    dec_before = {k: v.clone() for k, v in cap.decoder.state_dict().items()}
    disc_before = {k: v.clone() for k, v in disc.state_dict().items()}
    opt_g = torch.optim.SGD(policy.trainable_parameters(), lr=0.5)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.5)
    for seed in range(3):
        out = gan.step(torch.randn(4, 3, 32, 32), CORPUS, opt_g, opt_d, generator=torch.Generator().manual_seed(seed))
    assert all(math.isfinite(v) for v in out.values()) and 0 <= out["reward_naturalness"] <= 1
    assert all(torch.equal(v, judge_before[k]) for k, v in judge.state_dict().items())
    assert any(not torch.equal(v, dec_before[k]) for k, v in cap.decoder.state_dict().items())
    assert any(not torch.equal(v, disc_before[k]) for k, v in disc.state_dict().items())
    # the total reward is CLIP reward + lambda * naturalness, as the rewards are reported
    v = judge.encode_image(torch.randn(2, 3, 32, 32)).float()
    r = gan.rewards(v, ["a red circle", "circle circle"])
    assert torch.allclose(r["total"], r["clip"] + 0.5 * r["naturalness"])


def test_agg_needs_a_corpus(small_clip):
    from clipforge.captioning import frozen_judge

    with pytest.raises(ValueError, match="corpus"):
        CgTGAN(None, frozen_judge(small_clip), CaptionDiscriminator(width=8), reward="agg")
