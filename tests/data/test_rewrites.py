"""Rewrite providers and the sidecar that stores rewrites once."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clipforge.data.captions import CaptionPolicy, SourcedCaptions
from clipforge.data.rewrites import (
    LMRewriter,
    RewriteError,
    RewriteProvider,
    Rewrites,
    RuleRewriter,
    StaleRewritesError,
    laclip_prompt,
    load_rewrites,
    sidecar_path,
    store_rewrites,
)
from clipforge.data.shapes import ShapesGenerator
from clipforge.data.vocabulary import normalize


def test_rule_rewriter_hand_cases():
    r = RuleRewriter()
    assert isinstance(r, RewriteProvider)
    cands = r.candidates("a red circle.")
    assert "a circle in red." in cands  # attribute restated
    assert "an image of a red circle." in cands  # new frame, article agreeing with "image"
    assert "a red circle." not in cands
    assert "a little red circle." in r.candidates("a small red circle.")  # synonym from the table
    assert "a red circle." in r.candidates("a circle colored red.")
    assert "a red circle." in r.candidates("a picture of a red circle.")  # frame dropped
    assert "a picture of a coffee mug" in r.candidates("coffee mug")  # a bare noun gets its article
    assert r.candidates("開いたフォルダー") == [] and r.candidates("") == []  # non-English: nothing
    assert r.rewrite(["開いたフォルダー", "a dog."], 2, 0)[0] == []


def test_rule_rewriter_is_deterministic_and_never_returns_the_input():
    r = RuleRewriter()
    caps = [c for i in range(60) for c in ShapesGenerator("train", 1, 16).sample(i).captions]
    a = r.rewrite(caps, 3, seed=7)
    assert a == r.rewrite(caps, 3, seed=7)
    assert a != r.rewrite(caps, 3, seed=8)
    # a function of (seed, caption): the same in any batch or order
    assert r.rewrite(caps[::-1], 3, seed=7) == a[::-1]
    assert [r.rewrite([c], 3, 7)[0] for c in caps[:10]] == a[:10]
    for c, rws in zip(caps, a):
        assert len(rws) == 3 and len(set(rws)) == 3  # a change is always possible for these captions
        assert all(normalize(x) != normalize(c) for x in rws)


class FakeLM:
    """Answers like a text-generation pipeline that echoes the prompt."""

    def __init__(self, fail_on: int | None = None, wrong_length: bool = False):
        self.calls, self.fail_on, self.wrong_length = [], fail_on, wrong_length

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        if self.fail_on is not None and len(self.calls) - 1 == self.fail_on:
            raise RuntimeError("CUDA out of memory")
        if self.wrong_length:
            return [[{"generated_text": "x"}]]
        out = []
        for p in prompts:
            cap = p.rsplit("\n", 1)[1][: -len(" =>")]
            out.append([{"generated_text": p + f" A rewritten {cap}\nnext example => ignored"}])
        return out


def test_lm_rewriter_prompt_batching_and_parsing():
    prompt = laclip_prompt("a cat")
    assert prompt.endswith("\na cat =>") and prompt.count(" => ") == 3  # three in-context examples
    seeds = []
    fake = FakeLM()
    lm = LMRewriter(fake, name="fake", batch_size=4, set_seed=seeds.append)
    out = lm.rewrite(["a cat", "a dog", "a cow"], n=3, seed=10)
    assert len(fake.calls) == 3 and [len(c) for c in fake.calls] == [4, 4, 1]  # 9 prompts in batches of 4
    assert seeds == [10, 11, 12]
    assert out == [["A rewritten a cat"], ["A rewritten a dog"], ["A rewritten a cow"]]  # deduplicated, first line
    # plain strings and dicts are accepted, and an answer equal to the input is dropped
    lm2 = LMRewriter(lambda ps: ["A CAT", {"generated_text": "a feline"}], batch_size=2)
    assert lm2.rewrite(["a cat", "a cat"], 1, 0) == [[], ["a feline"]]


def test_lm_rewriter_errors_are_clear():
    with pytest.raises(
        RewriteError, match=r"LMRewriter 'm': batch 1 \(captions 2..3.*RuntimeError: CUDA out of memory"
    ) as e:
        LMRewriter(FakeLM(fail_on=1), name="m", batch_size=2).rewrite(["a", "b", "c", "d"], 1, 0)
    assert isinstance(e.value.__cause__, RuntimeError)
    with pytest.raises(RewriteError, match="returned 1 outputs for 2 prompts"):
        LMRewriter(FakeLM(wrong_length=True), batch_size=2).rewrite(["a", "b"], 1, 0)
    with pytest.raises(RewriteError, match="expected a string"):
        LMRewriter(lambda ps: [3 for _ in ps]).rewrite(["a"], 1, 0)


class Counting(RuleRewriter):
    name = "counting-rule"

    def __init__(self):
        super().__init__()
        self.captions_seen = 0

    def rewrite(self, captions, n, seed):
        self.captions_seen += len(captions)
        return super().rewrite(captions, n, seed)


def items(n=5, suffix=""):
    return [{"key": f"k{i}{suffix}", "image": None, "captions": [f"a red circle number {i}.", "three blue stars."]}
            for i in range(n)]


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_store_once_and_load(tmp_path, ext):
    path = tmp_path / f"train.rewrites.{ext}"
    p = Counting()
    rw = store_rewrites(items(), p, path, n=2, seed=3)
    assert p.captions_seen == 10 and path.exists()
    back = load_rewrites(path, items())
    assert back.keys == [f"k{i}" for i in range(5)] and back.rewrites == rw.rewrites
    assert back.meta["provider"] == "counting-rule" and back.meta["seed"] == 3 and back.meta["n"] == 2
    assert back.meta["captions"] == 10 and back.meta["captions_rewritten"] == 10
    assert back.for_key("k2") == back.for_index(2) and len(back.flat(2)) == 4
    assert back.rewrites[0] == RuleRewriter().rewrite(items()[0]["captions"], 2, 3)
    # asked again (a new epoch, a new run): read from the sidecar, the provider is not called
    again = store_rewrites(items(), p, path, n=2, seed=3)
    assert p.captions_seen == 10 and again.rewrites == rw.rewrites
    # other settings: refused, with the fix
    with pytest.raises(StaleRewritesError, match=r"seed: 3 there, 4 asked.*overwrite=True"):
        store_rewrites(items(), p, path, n=2, seed=4)
    store_rewrites(items(), p, path, n=2, seed=4, overwrite=True)
    assert p.captions_seen == 20 and load_rewrites(path).meta["seed"] == 4


def test_stale_sidecar_is_an_error_naming_the_fix(tmp_path):
    path = tmp_path / "r.parquet"
    store_rewrites(items(), RuleRewriter(), path)
    with pytest.raises(
        StaleRewritesError, match=r"5 samples, the dataset has 4; rerun store_rewrites\(\.\.\., overwrite=True\)"
    ):
        load_rewrites(path, items(4))
    with pytest.raises(StaleRewritesError, match="sample 0 has key 'k0x'"):
        load_rewrites(path, items(5, suffix="x"))
    changed = items()
    changed[3]["captions"] = ["something else."]
    with pytest.raises(StaleRewritesError, match="captions of sample 3"):
        store_rewrites(changed, RuleRewriter(), path)
    with pytest.raises(FileNotFoundError, match="store_rewrites"):
        load_rewrites(tmp_path / "missing.parquet")
    bad = tmp_path / "r.csv"
    with pytest.raises(ValueError, match=".parquet or .jsonl"):
        store_rewrites(items(), RuleRewriter(), bad)
    (tmp_path / "x.jsonl").write_text(json.dumps({"not": "meta"}) + "\n")
    with pytest.raises(ValueError, match="not a clipforge rewrites sidecar"):
        load_rewrites(tmp_path / "x.jsonl")


def test_languages_and_sourced_captions(tmp_path):
    data = [{"key": "u1", "image": np.zeros((3, 4, 4), np.uint8), "captions": ["open file folder", "carpeta abierta"],
             "caption_langs": ["en", "es"]}]
    rw = store_rewrites(data, RuleRewriter(), tmp_path / "e.jsonl", n=1, languages=["en"])
    assert len(rw.rewrites[0][0]) == 1 and rw.rewrites[0][1] == []  # the Spanish caption is not rewritten
    assert rw.meta["captions"] == 1 and rw.meta["languages"] == ["en"]
    ds = SourcedCaptions(data, rewrites=rw, extra={"synthetic": [["a yellow folder icon."]]})
    item = ds[0]
    assert item["captions"] == data[0]["captions"]
    assert item["caption_sources"] == {"rewrites": rw.rewrites[0][0], "synthetic": ["a yellow folder icon."]}
    pol = CaptionPolicy({"rewrites": 1.0})
    assert pol.sample(item, np.random.default_rng(0)) == ("rewrites", rw.rewrites[0][0][0])
    with pytest.raises(ValueError, match=r"extra\['synthetic'\] has 2 entries"):
        SourcedCaptions(data, extra={"synthetic": [["a"], ["b"]]})
    with pytest.raises(StaleRewritesError):
        SourcedCaptions(data + data, rewrites=rw)


def test_sidecar_path_next_to_shards():
    class Shards:
        root, split = "/data/emoji", "train"

    assert str(sidecar_path(Shards(), RuleRewriter())) == "/data/emoji/train.rewrites.rule.parquet"
    with pytest.raises(ValueError, match="pass a path"):
        sidecar_path([], RuleRewriter())
    with pytest.raises(TypeError, match="no rewrite"):
        store_rewrites([], object(), "/tmp/x.parquet")
    assert isinstance(Rewrites([], [], []), Rewrites)
