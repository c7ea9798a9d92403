"""MetaCLIP curation: matching, and balancing against distributions whose result is known."""
from __future__ import annotations

import numpy as np
import pytest

from clipforge.data.curation import EntryMatcher, balance, curate, entry_counts
from clipforge.data.entries import default_entries


def test_substring_and_word_boundary_matching():
    m = EntryMatcher(["cat", "red apple", "Dog"])
    assert [m.entries[i] for i in m.match("A Category of RED APPLES")] == ["cat", "red apple"]
    wb = EntryMatcher(["cat", "red apple", "dog"], word_boundary=True)
    assert wb.match("a category of red apples") == []
    assert [wb.entries[i] for i in wb.match("the cat, a dog.")] == ["cat", "dog"]
    cs = EntryMatcher(["Dog"], lowercase=False)
    assert cs.match("a dog") == [] and cs.match("a Dog") == [0]
    indptr, ids = m.match_all(["nothing here", ["a cat", "another cat and a dog"], "dog"])
    assert indptr.tolist() == [0, 0, 2, 3] and ids.tolist() == [0, 2, 2]


def test_t_above_every_count_keeps_every_matched_sample():
    texts = ["a cat", "a dog", "a cat and a dog", "no match", "the cat"] * 20
    r = curate(texts, ["cat", "dog"], t=1000, seed=3)
    assert r.matched == 80 and len(r.indices) == 80
    assert all("no match" != texts[i] for i in r.indices)
    assert r.counts_before.tolist() == r.counts_after.tolist() == [60, 40]


def test_head_entries_end_near_t_and_tail_is_kept():
    # entry 0 in 20,000 samples (alone), entry 1 in 300 samples; t = 500
    texts = ["head"] * 20_000 + ["tail"] * 300
    r = curate(texts, ["head", "tail"], t=500, seed=0)
    head_kept, tail_kept = r.counts_after.tolist()
    assert tail_kept == 300  # count below t: probability 1
    mean, sd = 20_000 * (500 / 20_000), np.sqrt(20_000 * 0.025 * 0.975)
    assert abs(head_kept - mean) < 5 * sd
    s = r.summary()
    assert s["head_entries"] == 1 and s["head_share_after"] < s["head_share_before"]


def test_hand_computed_balance_with_seeded_rng():
    # 4 samples; entry counts over the pool: e0 = 3, e1 = 1, e2 = 1; t = 1
    indptr = np.array([0, 1, 3, 3, 5])
    ids = np.array([0, 0, 1, 0, 2])
    counts = entry_counts(indptr, ids, 3)
    assert counts.tolist() == [3, 1, 1]
    u = np.random.default_rng(7).random(5)  # the draws balance() makes, in CSR order
    prob = np.array([1 / 3, 1 / 3, 1 / 1, 1 / 3, 1 / 1])
    expected = [u[0] < prob[0], (u[1] < prob[1]) or (u[2] < prob[2]), False, (u[3] < prob[3]) or (u[4] < prob[4])]
    keep = balance(indptr, ids, counts, 1.0, np.random.default_rng(7))
    assert keep.tolist() == expected
    # entries 1 and 2 have count 1 <= t, so samples 1 and 3 are always kept
    assert keep[1] and keep[3] and not keep[2]


def test_default_entries_and_distribution():
    entries = default_entries()
    assert len(entries) > 3000 and "cat" in entries and "circle" in entries and "grinning face" in entries
    r = curate(["a red circle", "a cat on a mat", "grinning face", "qxqxq"], t=10)
    assert r.matched == 3
    top = r.distribution(top=3)
    assert len(top) == 3 and all(before >= after for _, before, after in top)


def test_no_entries_is_an_error():
    with pytest.raises(ValueError):
        EntryMatcher(["", ""])
