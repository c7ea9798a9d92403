"""benchmarks/bench_maccap.py's fidelity plug-ins (recipes maccap and maccap_rl): the caption scores they report,
the shared starting captioner of maccap_rl, and their refusals of unknown methods."""
from __future__ import annotations

import pytest
import torch
from benchhelpers import load_benchmark


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    b = load_benchmark("bench_maccap.py")
    b.CACHE = tmp_path_factory.mktemp("maccap-cache")
    return b


@pytest.fixture(scope="module")
def captioner(bench):
    return bench.base_maccap(0, clip_steps=2, decoder_steps=3, batch=8, text_scenes=50)


def test_scores_of_the_scenes_own_captions_and_of_a_constant_caption(bench, captioner):
    images, items = bench._val(24, captioner.image_size)
    judge = bench.frozen_judge(captioner.clip)
    own = [it["captions"][0] for it in items]
    good = bench.score_captions(own, items, images, judge)
    assert good["attr_color"] == good["attr_shape"] == good["attr_count"] == good["attr_mean"] == 1.0
    assert good["distinct_captions"] == len(set(own)) > 1
    bad = bench.score_captions(["a photo"] * len(items), items, images, judge)
    assert bad["attr_color"] == bad["attr_shape"] == 0.0 and bad["distinct_captions"] == 1
    assert bad["cider_d"] < good["cider_d"] and bad["bleu4"] < good["bleu4"]
    # CLIP-S written out (Hessel et al. 2021): w * max(cos(image, text), 0), w = 2.5, averaged over the images
    tok = captioner.tokenizer
    with torch.no_grad():
        t = torch.nn.functional.normalize(judge.encode_text(tok(own)).float(), dim=-1)
        v = torch.nn.functional.normalize(judge.encode_image(images).float(), dim=-1)
    expected = float((2.5 * (t * v).sum(-1).clamp(min=0)).mean())
    assert good["clip_s"] == pytest.approx(expected, abs=1e-5)


def test_every_rl_arm_of_a_seed_starts_from_one_cached_captioner(bench, captioner, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the starting captioner was trained again instead of loaded from the cache")

    monkeypatch.setattr(bench, "train_maccap", no_training)
    monkeypatch.setattr(bench, "_fit", no_training)
    again = bench.base_maccap(0, clip_steps=2, decoder_steps=3, batch=8, text_scenes=50)
    for (name, a), b in zip(captioner.decoder.state_dict().items(), again.decoder.state_dict().values()):
        assert torch.equal(a, b), name
    cached = [p.name for p in bench.CACHE.iterdir()]
    assert len(cached) == 1 and not cached[0].endswith(".partial")


def test_unknown_methods_are_refused_with_the_choices(bench):
    with pytest.raises(ValueError, match="none, scst, cgtgan_cos or cgtgan_agg"):
        bench.rl_arm(0, 1, 2, 4, method="ppo")
    with pytest.raises(ValueError, match="coca or maccap"):
        bench.equal_time_arm(0, 1, 2, 4, method="blip")

