"""Grammar fine-tuning against degenerate captions (Cho et al., 2022): the negative generator, the head's loss
against the BCE written out here, fine-tuning that separates real from degenerate captions, and the SCST reward
CLIP-S + lambda * grammar score."""
import math
import random

import pytest
import torch

from clipforge.captioning.grammar import (
    GrammarHead,
    clip_s_grammar_reward,
    degenerate_caption,
    degenerate_captions,
    finetune_grammar,
    grammar_loss,
    grammar_scores,
)

CAPTIONS = ["a red circle above a blue square", "two green triangles", "one yellow star left of a red circle",
            "three blue squares", "a small green circle", "a big red triangle below two stars"]


def test_repeat_truncate_shuffle_negatives():
    rng = random.Random(0)
    for c in CAPTIONS:
        words = c.split()
        for _ in range(10):
            t = degenerate_caption(c, "truncate", rng).split()
            assert 1 <= len(t) < len(words) and t == words[: len(t)]
            s = degenerate_caption(c, "shuffle", rng).split()
            assert sorted(s) == sorted(words) and s != words
            r = degenerate_caption(c, "repeat", rng).split()
            assert len(r) > len(words) and set(r) == set(words)
            # a repeat inserts copies of one contiguous span right after it: removing them gives the caption back
            extra = len(r) - len(words)
            assert any(r[:i] + r[i + extra:] == words for i in range(len(r) - extra + 1))
    assert degenerate_caption("circle", "shuffle", rng).split() in (["circle"] * 2, ["circle"] * 3)
    negs, kinds = degenerate_captions(CAPTIONS, random.Random(1))
    assert len(negs) == len(CAPTIONS) and all(n != c for n, c in zip(negs, CAPTIONS)) and set(kinds) <= {
        "repeat", "truncate", "shuffle"}
    with pytest.raises(ValueError, match="kind"):
        degenerate_caption("a b", "insert", rng)


def test_grammar_loss_is_the_bce_of_the_paper():
    pos, neg = torch.tensor([2.0, -0.5, 0.3]), torch.tensor([-1.0, 0.7])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    naive = -(sum(math.log(sig(float(p))) for p in pos) + sum(math.log(1 - sig(float(n))) for n in neg)) / 5
    assert float(grammar_loss(pos, neg)) == pytest.approx(naive, rel=1e-6)


def test_finetuning_separates_real_from_degenerate_captions(small_clip):
    import copy

    clip = copy.deepcopy(small_clip)
    images = torch.randn(len(CAPTIONS), 3, 32, 32)
    visual_before = {k: v.clone() for k, v in clip.state_dict().items() if k.startswith("visual.")}
    head, history = finetune_grammar(clip, CAPTIONS, images, steps=60, batch_size=6, lr=3e-3, seed=0)
    assert history[-1]["grammar"] < history[0]["grammar"] and "contrastive" in history[0]
    assert all(torch.equal(v, visual_before[k]) for k, v in clip.state_dict().items() if k.startswith("visual."))
    negs, _ = degenerate_captions(CAPTIONS, random.Random(7))
    real, fake = grammar_scores(clip, head, CAPTIONS), grammar_scores(clip, head, negs)
    assert float(real.mean()) > float(fake.mean())


def test_reward_adds_the_weighted_grammar_score_to_clip_s(small_clip):
    from clipforge.captioning import clip_s
    from clipforge.tokenizer import get_tokenizer

    head = GrammarHead(int(small_clip.cfg.embed_dim))
    images = torch.randn(2, 3, 32, 32)
    texts = ["a red circle", "circle circle circle"]
    r = clip_s_grammar_reward(small_clip, head, weight=0.5)(images, texts)
    with torch.no_grad():
        t = small_clip.encode_text(get_tokenizer(small_clip.context_length)(texts)).float()
        v = small_clip.encode_image(images).float()
        expected = [float(clip_s(t[i:i + 1], v[i:i + 1])) + 0.5 / (1 + math.exp(-float(head(t[i])))) for i in range(2)]
    assert r.tolist() == pytest.approx(expected, rel=1e-5)


def test_scst_step_takes_the_grammar_reward(small_clip):
    import copy

    from clipforge.captioning import MacCapConfig, MacCapPolicy, frozen_judge, scst_step, train_maccap

    cfg = MacCapConfig(width=16, layers=1, heads=2, n_queries=2, align_heads=2, n_features=3, max_len=8)
    cap, _ = train_maccap(copy.deepcopy(small_clip), CAPTIONS, cfg, steps=2, batch_size=4)
    policy = MacCapPolicy(cap)
    judge = frozen_judge(cap.clip)
    head = GrammarHead(int(judge.cfg.embed_dim))
    calls = []
    base = clip_s_grammar_reward(judge, head, weight=1.0)

    def reward(images, texts):
        calls.append(texts)
        return base(images, texts)

    out = scst_step(policy, judge, torch.randn(3, 3, 32, 32), torch.optim.SGD(policy.trainable_parameters(), lr=0.1),
                    generator=torch.Generator().manual_seed(0), reward=reward)
    assert len(calls) == 2 and math.isfinite(out["loss"]) and 0 <= out["reward_sample"] <= 3.5
