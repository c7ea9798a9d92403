"""Tokenizer throughput: clipforge (HF `tokenizers`, batched) vs a pure-Python BPE loop.

The pure-Python loop is tests/reference/clip_bpe.py, a re-derivation of OpenAI's original
simple_tokenizer (same cleaning, same regex, greedy merges, with its word cache warm).
Both produce identical ids (checked here on every text before timing).

    python benchmarks/bench_tokenizer.py [--texts 20000]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from reference.clip_bpe import PATTERN, NaiveCLIPBPE  # noqa: E402

from clipforge.data.shapes import ShapesGenerator  # noqa: E402
from clipforge.tokenizer import CLIPTokenizer, clean_text, default_bpe_path  # noqa: E402


def corpus(n: int) -> list[str]:
    """Varied text: sentences of Python's own documentation (diverse English vocabulary),
    shapes captions, and accented / CJK / emoji / URL strings, cycled to ``n`` texts."""
    import re

    try:
        from pydoc_data.topics import topics

        prose = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(topics.values())) if 20 < len(s.strip()) < 300]
    except ImportError:  # some distributions strip pydoc_data
        prose = []
    gen = ShapesGenerator(seed=0)
    extras = ["Café naïve résumé 🐶 — «quoted»", "東京タワーの写真 at night, 2026", "it's a 3.14159 long-ish URL http://x.org/a?b=c&d=e"]
    texts, i = [], 0
    while len(texts) < n:
        if prose:
            texts.append(prose[i % len(prose)])
        texts.extend(gen.sample(i).captions[:1])
        texts.append(extras[i % len(extras)] + f" #{i}")
        i += 1
    return texts[:n]


class _NoCache(dict):
    def __setitem__(self, key, value):
        pass


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=20000)
    args = ap.parse_args()
    texts = corpus(args.texts)
    ours, naive = CLIPTokenizer(77), NaiveCLIPBPE(str(default_bpe_path()))
    t = time.perf_counter()
    ref = torch.tensor(naive.tokenize(texts))  # first pass: the word cache starts empty
    t_cold = time.perf_counter() - t
    t_warm = timed(lambda: naive.tokenize(texts), repeats=1)
    assert torch.equal(ours(texts), ref), "ids differ from the reference"
    t_ours = timed(lambda: ours(texts))
    print(f"{len(texts)} texts, {len(set(texts))} distinct, {torch.get_num_threads()} threads, ids identical")
    print("| tokenizer | texts/s | clipforge speed-up |\n|---|---:|---:|")
    print(f"| pure-Python BPE loop, cold word cache | {len(texts) / t_cold:,.0f} | {t_cold / t_ours:.1f}x |")
    print(f"| pure-Python BPE loop, warm word cache | {len(texts) / t_warm:,.0f} | {t_warm / t_ours:.1f}x |")
    print(f"| clipforge (tokenizers, batched) | {len(texts) / t_ours:,.0f} | 1.0x |")

    # The BPE stage alone (cleaned text in, ids out): both sides skip the shared ftfy cleaning.
    cleaned = [clean_text(t) for t in texts]
    fresh = NaiveCLIPBPE(str(default_bpe_path()))

    def naive_bpe(tok):
        for text in cleaned:
            for piece in PATTERN.findall(text):
                tok.bpe("".join(tok.byte_encoder[b] for b in piece.encode("utf-8")))

    t = time.perf_counter()
    naive_bpe(fresh)
    b_cold = time.perf_counter() - t
    b_warm = timed(lambda: naive_bpe(fresh), repeats=1)
    fresh.cache = _NoCache()  # the merge loop itself, run for every word
    b_none = timed(lambda: naive_bpe(fresh), repeats=1)
    fast = getattr(ours._tok, "encode_batch_fast", ours._tok.encode_batch)
    b_ours = timed(lambda: fast(cleaned, add_special_tokens=False))
    print("\nBPE stage only (pre-cleaned text)\n| tokenizer | texts/s | clipforge speed-up |\n|---|---:|---:|")
    print(f"| pure-Python BPE loop, no word cache | {len(texts) / b_none:,.0f} | {b_none / b_ours:.1f}x |")
    print(f"| pure-Python BPE loop, cold word cache | {len(texts) / b_cold:,.0f} | {b_cold / b_ours:.1f}x |")
    print(f"| pure-Python BPE loop, warm word cache | {len(texts) / b_warm:,.0f} | {b_warm / b_ours:.1f}x |")
    print(f"| clipforge (tokenizers, batched) | {len(texts) / b_ours:,.0f} | 1.0x |")


if __name__ == "__main__":
    main()
