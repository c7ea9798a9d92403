"""Caption noise (GA-DMS's setting): which samples are corrupted, what a noisy caption holds, determinism, the
clean captions kept beside, and clear errors; the training config's data.caption_noise."""
import numpy as np
import pytest

from clipforge.data import build_dataset
from clipforge.data.caption_noise import IRRELEVANT, NoisyCaptions, noisy_caption


def test_noisy_caption_kinds_on_hand_cases():
    rng = np.random.default_rng(0)
    wrong = noisy_caption("a small red circle.", rng, ["wrong"], avoid=["red", "circle", "small"])
    a, b = "a small red circle.".split(), wrong.split()
    assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) in (1, 2)  # one word (+ its article)
    assert wrong != "a small red circle."
    extra = noisy_caption("a small red circle.", rng, ["irrelevant"], irrelevant_words=3)
    words = extra[:-1].split()
    assert extra.endswith(".") and len(words) == 7 and sum(w in IRRELEVANT for w in words) == 3
    assert [w for w in words if w not in IRRELEVANT] == ["a", "small", "red", "circle"]  # order kept
    assert noisy_caption("hello there", rng, ["wrong"]) == "hello there"  # nothing to replace
    with pytest.raises(ValueError, match="unknown caption noise kind"):
        noisy_caption("a red circle.", rng, ["typo"])


def test_noisy_captions_corrupt_the_chosen_fraction_deterministically():
    base = build_dataset("shapes", split="train", size=200, seed=0, image_size=32)
    ds = NoisyCaptions(base, 0.3, seed=1)
    items = [ds[i] for i in range(200)]
    noisy = [it["caption_noise"] for it in items]
    assert 0.2 < np.mean(noisy) < 0.4
    for it, clean in zip(items, (base[i] for i in range(200))):
        assert it["clean_captions"] == clean["captions"]
        if it["caption_noise"]:
            assert all(c != o for c, o in zip(it["captions"], clean["captions"]))
            # a wrong word is never one that is true of the image (its region captions' words)
            true = {w.strip(".,") for c in clean["region_captions"] for w in c.split()}
            for c, o in zip(it["captions"], clean["captions"]):
                added = set(c.strip(".").replace(",", "").split()) - set(o.strip(".").replace(",", "").split())
                assert not (added - set(IRRELEVANT) - {"a", "an"}) & true  # articles follow the new word
        else:
            assert it["captions"] == clean["captions"]
    again = NoisyCaptions(base, 0.3, seed=1)
    assert [again[i]["captions"] for i in range(20)] == [it["captions"] for it in items[:20]]
    assert NoisyCaptions(base, 0.0)[3]["captions"] == base[3]["captions"]
    assert all(NoisyCaptions(base, 1.0)[i]["caption_noise"] for i in range(10))
    assert ds.label_views == base.label_views  # the wrapped dataset's attributes pass through
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        NoisyCaptions(base, 1.5)
    with pytest.raises(ValueError, match="non-empty subset"):
        NoisyCaptions(base, 0.5, kinds=[])


def test_train_config_checks_caption_noise(tiny_cfg):
    from dataclasses import replace

    from clipforge.errors import ConfigError

    with pytest.raises(ConfigError, match="data.caption_noise"):
        replace(tiny_cfg, data=replace(tiny_cfg.data, caption_noise=-0.1)).validate()
    with pytest.raises(ConfigError, match="caption_noise_kinds"):
        replace(tiny_cfg, data=replace(tiny_cfg.data, caption_noise=0.5, caption_noise_kinds=["typo"])).validate()
