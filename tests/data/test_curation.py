"""MetaCLIP curation: matching, and balancing against distributions whose result is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch

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


def _shard_set(root, captions_train, captions_val=("a val cat",)):
    """A tiny shard set written with the shard writer: one PNG per sample, captions, a label view."""
    import io

    from PIL import Image

    from clipforge.data.shards import ShardSample, ShardSetWriter

    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 20 % 256, 0, 0)).save(buf, format="PNG")
        return buf.getvalue()

    w = ShardSetWriter(root, target_bytes=2000)
    for split, caps in (("train", captions_train), ("val", captions_val)):
        keys = [f"{split}{i:03d}" for i in range(len(caps))]
        samples = {k: ShardSample(k, png(i), [c], {"kind": i % 2}, extra={"caption_langs": ["en"]})
                   for i, (k, c) in enumerate(zip(keys, caps))}
        w.write_split(split, keys, lambda ks, s=samples: (s[k] for k in ks))
    return w.finish("toy", {"kind": {"classes": ["even", "odd"], "templates": ["a {}."]}})


def test_curate_shards_keeps_what_curate_keeps_byte_for_byte(tmp_path):
    """The written train split is exactly curate()'s selection on the same captions (recomputed here), the
    images and metadata are the source's, val is copied whole, and the manifest records the summary."""
    from clipforge.data.curation import curate_shards
    from clipforge.data.shards import ShardDataset, shard_entries

    caps = [f"a red cat number {i}" for i in range(30)] + ["a dog", "a blue dog", "nothing here", "a bird"]
    _shard_set(tmp_path / "src", caps)
    entries = ["cat", "dog", "bird"]
    manifest = curate_shards(tmp_path / "src", tmp_path / "out", entries, t=5, seed=3, shard_bytes=2000)
    expected = curate([[c] for c in caps], entries, t=5, seed=3).indices.tolist()
    assert {30, 31, 33} <= set(expected) and 32 not in expected  # the dogs and the bird (tail) kept, no match dropped
    src, out = ShardDataset(tmp_path / "src"), ShardDataset(tmp_path / "out")
    assert [out[i]["key"] for i in range(len(out))] == [src[i]["key"] for i in expected]
    for i, j in enumerate(expected):
        a, b = src[j], out[i]
        assert torch.equal(a["image"], b["image"]) and a["captions"] == b["captions"] and a["labels"] == b["labels"]
    written = [e for path in sorted((tmp_path / "out").glob("train-*.tar")) for e in shard_entries(path)]
    assert [e.key for e in written] == [src[i]["key"] for i in expected]
    assert all(e.meta["caption_langs"] == ["en"] and e.meta["split"] == "train" for e in written)  # metadata travels
    assert len(ShardDataset(tmp_path / "out", split="val")) == 1
    c = manifest["curation"]
    assert (c["pool"], c["matched"], c["kept"], c["t"]) == (34, 33, len(expected), 5)
    assert manifest["label_views"]["kind"]["classes"] == ["even", "odd"]
    assert sum(1 for j in expected if j < 30) < 30  # the head entry 'cat' was balanced down


def test_curate_shards_bad_input(tmp_path):
    from clipforge.data.curation import curate_shards, read_entries

    _shard_set(tmp_path / "src", ["a cat"])
    with pytest.raises(ValueError, match="t must be positive"):
        curate_shards(tmp_path / "src", tmp_path / "o1", ["cat"], t=0)
    with pytest.raises(ValueError, match="no train caption .* matches"):
        curate_shards(tmp_path / "src", tmp_path / "o2", ["zebra"], t=1)
    with pytest.raises(FileNotFoundError, match="one entry per line or 'builtin'"):
        read_entries(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("# comment\ncat\n\ndog\n")
    assert read_entries(tmp_path / "e.txt") == ["cat", "dog"] and "cat" in read_entries("builtin")
