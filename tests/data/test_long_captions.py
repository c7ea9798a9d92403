"""Sentence splitting, sub-caption sampling and caption-length statistics on hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest

from clipforge.data.long_captions import (
    corpus_length_stats,
    length_stats,
    sample_subcaptions,
    short_and_long,
    split_sentences,
    subcaptions_at,
)


@pytest.mark.parametrize("text, want", [
    ("Dr. Smith holds a cat, e.g. a tabby. It weighs 3.5 kg! Is it big? Yes.",
     ["Dr. Smith holds a cat, e.g. a tabby.", "It weighs 3.5 kg!", "Is it big?", "Yes."]),
    ("Apples, pears, etc. are fruit. We saw apples, pears, etc. Then we left.",
     ["Apples, pears, etc. are fruit.", "We saw apples, pears, etc.", "Then we left."]),
    ("J. R. R. Tolkien wrote it. The U.S. flag waves.\nA new line here",
     ["J. R. R. Tolkien wrote it.", "The U.S. flag waves.", "A new line here"]),
    ("A photo (i.e. a picture) of a dog. \"Hello.\" She said.",
     ["A photo (i.e. a picture) of a dog.", "\"Hello.\"", "She said."]),
    ("The price is 2.50 dollars vs. 3.00 yesterday. fine.", ["The price is 2.50 dollars vs. 3.00 yesterday.", "fine."]),
    ("no punctuation at all", ["no punctuation at all"]),
    ("   ", []),
])
def test_split_sentences(text, want):
    assert split_sentences(text) == want


LONG = ("A red circle sits on the left. A blue square is on the right. Both are small. "
        "The background is dark. There is nothing else.")


def test_subcaptions_are_sentences_reproducible_and_distinct():
    sents = split_sentences(LONG)
    assert len(sents) == 5
    subs = sample_subcaptions(LONG, 3, seed := 4)
    assert len(subs) == 3 and len(set(subs)) == 3 and set(subs) <= set(sents)
    assert subs == sample_subcaptions(LONG, 3, seed)
    assert sample_subcaptions(LONG, 10, 0, replace=False) and len(sample_subcaptions(LONG, 10, 0)) == 5  # fewer spans
    assert len(sample_subcaptions(LONG, 10, 0, replace=True)) == 10
    spans = sample_subcaptions(LONG, 9, 0, max_sentences=2)  # 5 singles + 4 consecutive pairs
    assert len(spans) == 9 and set(spans) == set(sents) | {f"{a} {b}" for a, b in zip(sents, sents[1:])}
    # over many seeds every sentence is drawn about equally often (k=1 of 5: p = 0.2)
    counts = {s: 0 for s in sents}
    for i in range(2000):
        counts[sample_subcaptions(LONG, 1, np.random.default_rng(i))[0]] += 1
    assert all(abs(c - 400) <= 5 * np.sqrt(2000 * 0.2 * 0.8) for c in counts.values())
    e0 = subcaptions_at(LONG, 2, seed=0, epoch=0, index=7)
    assert e0 == subcaptions_at(LONG, 2, seed=0, epoch=0, index=7)
    assert any(subcaptions_at(LONG, 2, seed=0, epoch=e, index=7) != e0 for e in range(1, 6))
    assert sample_subcaptions("", 3, 0) == [] and sample_subcaptions(LONG, 0, 0) == []
    with pytest.raises(ValueError):
        sample_subcaptions(LONG, -1, 0)


def test_short_and_long():
    assert short_and_long(LONG) == ("A red circle sits on the left.", LONG)
    assert short_and_long("one sentence") == ("one sentence", "one sentence")


def test_length_stats_hand_computed():
    # "a red circle." -> a, red, circle, "." = 4 tokens + start + end = 6; 13 characters, 3 words
    # 80 x "word" -> 80 tokens + 2 = 82 > 77
    s = length_stats(["a red circle.", " ".join(["word"] * 80)])
    assert s["captions"] == 2
    assert s["characters"]["max"] == 399 and s["characters"]["mean"] == (13 + 399) / 2
    assert s["words"]["mean"] == (3 + 80) / 2
    assert s["tokens"]["max"] == 82 and s["tokens"]["mean"] == (6 + 82) / 2
    assert s["over_context"] == 1 and s["fraction_over_context"] == 0.5
    # exactly 77 with start and end tokens is not over the context
    assert length_stats([" ".join(["word"] * 75)])["over_context"] == 0
    assert length_stats([" ".join(["word"] * 76)])["over_context"] == 1
    assert length_stats([])["captions"] == 0


def test_corpus_stats_per_language():
    recs = [{"key": "a", "captions": ["a cat", "un gato", "eine katze"], "caption_langs": ["en", "es", "de"]},
            {"key": "b", "captions": ["a dog"], "caption_langs": ["en"]}, {"key": "c", "captions": ["plain"]}]
    s = corpus_length_stats(recs)
    assert s["all"]["captions"] == 5 and s["en"]["captions"] == 2 and s["es"]["captions"] == 1
    assert s["en"]["characters"]["mean"] == 5.0 and set(s) == {"all", "de", "en", "es"}
    assert set(corpus_length_stats(recs, by_language=False)) == {"all"}
