"""Caption sources and the sampling policy: validation, fallback, and empirical frequencies."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from clipforge.data.captions import CAPTION_SOURCES, CaptionPolicy, caption_records, caption_sources, source_negatives

N = 20_000


def within_binomial(count: int, n: int, p: float, z: float = 5.0) -> bool:
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1e-9


def draws(policy: CaptionPolicy, item, n: int = N, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    return [policy.sample(item, rng) for _ in range(n)]


ITEM = {"image": None, "captions": ["a red circle."],
        "caption_sources": {"rewrites": [["a circle in red.", "an image of a red circle."], ["a red disc."]],
                            "synthetic": ["a red round shape on a dark background."]}}


def test_sources_of_an_item():
    s = caption_sources(ITEM)
    assert set(s) == set(CAPTION_SOURCES)
    assert s["original"] == ["a red circle."]
    assert s["rewrites"] == ["a circle in red.", "an image of a red circle.", "a red disc."]  # flattened
    assert s["short_tags"] == [] and s["negative_descriptions"] == []
    top = caption_sources({"captions": "one", "short_tags": "red, circle", "original": ["x", " "]})
    assert top["original"] == ["x"] and top["short_tags"] == ["red, circle"]  # explicit original wins, blanks drop
    with pytest.raises(TypeError, match="'synthetic'"):
        caption_sources({"captions": ["a"], "synthetic": [3]})
    with pytest.raises(ValueError, match="unknown source"):
        caption_sources({"captions": ["a"], "caption_sources": {"rewrite": ["b"]}})


@pytest.mark.parametrize("kwargs, field", [
    ({"weights": {"rewrite": 1.0}}, "weights['rewrite']"),
    ({"weights": {"original": -1.0}}, "weights['original']"),
    ({"weights": {"original": float("nan")}}, "weights['original']"),
    ({"weights": {"original": True}}, "weights['original']"),
    ({"weights": {"original": 0.0, "rewrites": 0.0}}, "positive total"),
    ({"weights": {}}, "non-empty"),
    ({"weights": {"negative_descriptions": 1.0}}, "weights['negative_descriptions']"),
    ({"fallback": ("original", "captions")}, "fallback: unknown caption source 'captions'"),
])
def test_validation_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        CaptionPolicy(**kwargs)
    assert field in str(e.value)


def test_mix_and_parse():
    p = CaptionPolicy.mix(0.8)
    assert p.weights == {"synthetic": 0.8, "original": pytest.approx(0.2)}
    with pytest.raises(ValueError, match="synthetic_ratio"):
        CaptionPolicy.mix(1.5)
    with pytest.raises(ValueError, match="different sources"):
        CaptionPolicy.mix(0.5, synthetic="original")
    assert CaptionPolicy.parse("original=0.5, rewrites=0.5").weights == {"original": 0.5, "rewrites": 0.5}
    assert CaptionPolicy.parse({"original": 2}).weights == {"original": 2}
    with pytest.raises(ValueError, match=r"weights\['rewrites'\]: 'x' is not a number"):
        CaptionPolicy.parse("original=1,rewrites=x")
    with pytest.raises(ValueError, match="SOURCE=WEIGHT"):
        CaptionPolicy.parse("original")


def test_source_frequencies_match_weights():
    policy = CaptionPolicy({"original": 0.3, "rewrites": 0.7})
    got = draws(policy, ITEM)
    by_source = Counter(s for s, _ in got)
    assert set(by_source) == {"original", "rewrites"}
    assert within_binomial(by_source["original"], N, 0.3)
    # uniform within a source: each of the 3 rewrites has probability 0.7 / 3
    by_caption = Counter(c for s, c in got if s == "rewrites")
    assert len(by_caption) == 3
    assert all(within_binomial(k, N, 0.7 / 3) for k in by_caption.values())


def test_per_caption_weighting_is_laclip_uniform():
    # LaCLIP: uniform over the original and its 3 rewrites -> the original has probability 1/4
    policy = CaptionPolicy({"original": 1, "rewrites": 1}, per_caption=True)
    assert policy.probabilities(caption_sources(ITEM)) == {"original": 0.25, "rewrites": 0.75}
    by_source = Counter(s for s, _ in draws(policy, ITEM))
    assert within_binomial(by_source["original"], N, 0.25)


def test_mix_ratio_frequency():
    by_source = Counter(s for s, _ in draws(CaptionPolicy.mix(0.8), ITEM, seed=1))
    assert within_binomial(by_source["synthetic"], N, 0.8) and by_source["synthetic"] + by_source["original"] == N


def test_empty_sources_fall_back_cleanly():
    policy = CaptionPolicy({"original": 0.5, "rewrites": 0.5})
    plain = {"captions": ["only one."]}  # no rewrites: every draw is the original, weights renormalized
    assert {policy.sample(plain, np.random.default_rng(i)) for i in range(50)} == {("original", "only one.")}
    assert policy.probabilities(caption_sources(plain)) == {"original": 1.0}
    synth_only = {"captions": [], "synthetic": ["a synthetic caption."]}
    assert policy.sample(synth_only, np.random.default_rng(0)) == ("synthetic", "a synthetic caption.")
    strict = CaptionPolicy({"rewrites": 1.0}, fallback=("short_tags",))
    assert strict.probabilities(caption_sources(synth_only)) == {}
    with pytest.raises(ValueError, match="key 'k7'.*no caption"):
        strict.sample({"key": "k7", "captions": ["x"], "synthetic": ["y"]}, np.random.default_rng(0))
    # a source with weight 0 is never drawn while another weighted source has captions
    zero = CaptionPolicy({"original": 1.0, "synthetic": 0.0})
    assert {s for s, _ in draws(zero, ITEM, n=200)} == {"original"}


def test_draws_are_reproducible():
    policy = CaptionPolicy({"original": 1, "rewrites": 1, "synthetic": 1})
    assert draws(policy, ITEM, n=100, seed=4) == draws(policy, ITEM, n=100, seed=4)
    assert draws(policy, ITEM, n=100, seed=4) != draws(policy, ITEM, n=100, seed=5)
    a = [policy.sample_at(ITEM, seed=0, epoch=e, index=3) for e in range(20)]
    assert a == [policy.sample_at(ITEM, seed=0, epoch=e, index=3) for e in range(20)]
    assert len(set(a)) > 1  # different epochs draw differently
    # a {source: [captions]} dict is accepted as well as an item
    assert policy.sample(caption_sources(ITEM), np.random.default_rng(2)) == policy.sample(
        ITEM, np.random.default_rng(2)
    )


def test_negative_descriptions_become_typed_negatives():
    item = {"captions": ["a cat."], "negatives": {"color": ["a blue cat."]},
            "negative_descriptions": ["there is no dog in the picture."]}
    assert source_negatives(item) == {"color": ["a blue cat."], "description": ["there is no dog in the picture."]}
    assert source_negatives({"captions": ["a"]}) == {}


def test_caption_records_of_shapes_and_lists():
    from clipforge.data import build_dataset

    recs = caption_records(build_dataset("shapes", size=5, image_size=16))
    assert [r["key"] for r in recs] == ["0", "1", "2", "3", "4"]
    ds = build_dataset("shapes", size=5, image_size=16)
    assert [r["captions"] for r in recs] == [ds[i]["captions"] for i in range(5)]
    items = [{"key": "a", "image": None, "captions": "x", "caption_langs": ["en"]}, {"image": None, "captions": ["y"]}]
    assert caption_records(items) == [{"key": "a", "captions": ["x"], "caption_langs": ["en"]},
                                      {"key": "1", "captions": ["y"]}]
