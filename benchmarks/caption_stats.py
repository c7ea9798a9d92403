"""Caption-side numbers of the built corpora: rewrites, hard negatives by type, caption lengths.

    PYTHONPATH=src python benchmarks/caption_stats.py [--split train] [--corpora openclipart emoji shapes]

Reads the caption metadata of the shards (no image decoding). For each corpus it prints:
how many captions the offline RuleRewriter rewrites (emoji: English captions only, the rule
table is English), how many samples get a negative of each type (written from each sample's
first caption, as ``negatives_for_item`` does) and how many captions of all captions would
get one, and the caption-length statistics (characters, words, CLIP tokens, share over 77).
A corpus that is not built is reported and skipped.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np

from clipforge.data import build_dataset
from clipforge.data.captions import caption_records
from clipforge.data.long_captions import corpus_length_stats
from clipforge.data.negatives import GENERATORS, NEGATIVE_TYPES, negatives_for_captions
from clipforge.data.rewrites import RuleRewriter
from clipforge.data.shards import DataNotBuiltError


def records_of(name: str, split: str, shapes_size: int):
    if name == "shapes":
        return caption_records(build_dataset("shapes", split=split, size=shapes_size, image_size=16))
    return caption_records(build_dataset(name, split=split, image_size=None))


def english(rec):
    langs = rec.get("caption_langs")
    return [c for c, lang in zip(rec["captions"], langs) if lang == "en"] if langs else rec["captions"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="train")
    ap.add_argument("--corpora", nargs="+", default=["openclipart", "emoji", "shapes"])
    ap.add_argument("--shapes-size", type=int, default=2000)
    args = ap.parse_args()
    rule = RuleRewriter()
    rows_rw, rows_neg, rows_len = [], [], []
    for name in args.corpora:
        try:
            recs = records_of(name, args.split, args.shapes_size)
        except DataNotBuiltError as e:
            print(f"{name}: not built ({e})")
            continue
        t0 = time.perf_counter()
        caps = [c for r in recs for c in english(r)]
        rws = rule.rewrite(caps, 1, seed=0)
        t_rw = time.perf_counter() - t0
        n_all = sum(len(r["captions"]) for r in recs)
        rows_rw.append((name, len(recs), n_all, len(caps), sum(1 for r in rws if r), t_rw))
        t0 = time.perf_counter()
        per_sample = Counter()
        for r in recs:
            first = english(r)
            if first:
                per_sample.update(negatives_for_captions(first, seed=0).keys())
        per_caption = Counter()
        for c in caps:  # every English caption on its own
            rng = np.random.default_rng(0)
            for kind in NEGATIVE_TYPES:
                if GENERATORS[kind](c, rng, None) is not None:
                    per_caption[kind] += 1
        t_neg = time.perf_counter() - t0
        rows_neg.append((name, len(recs), len(caps), per_sample, per_caption, t_neg))
        stats = corpus_length_stats(recs)
        rows_len.append((name, "all", stats["all"]))
        if "en" in stats:
            rows_len.append((name, "en", stats["en"]))
    print(f"\nRuleRewriter (n=1, seed 0), split {args.split}\n")
    print("| corpus | samples | captions | rewritable (English) | with a rewrite | share | time |")
    print("|---|---|---|---|---|---|---|")
    for name, ns, na, ne, nr, t in rows_rw:
        print(f"| {name} | {ns:,} | {na:,} | {ne:,} | {nr:,} | {nr / max(ne, 1):.1%} | {t:.1f} s |")
    print(f"\nHard negatives by type, split {args.split}: samples with one (from the first English caption, "
          "true captions avoided) / English captions with one\n")
    print("| corpus | " + " | ".join(NEGATIVE_TYPES) + " | time |")
    print("|---|" + "---|" * (len(NEGATIVE_TYPES) + 1))
    for name, ns, nc, ps, pc, t in rows_neg:
        cells = [f"{ps[k]:,} ({ps[k] / ns:.0%}) / {pc[k]:,} ({pc[k] / max(nc, 1):.0%})" for k in NEGATIVE_TYPES]
        print(f"| {name} | " + " | ".join(cells) + f" | {t:.1f} s |")
    print(f"\nCaption lengths, split {args.split} (tokens: CLIP BPE incl. start/end; over 77 = truncated by a "
          "77-token text tower)\n")
    print("| corpus | captions | n | chars mean / p50 / p95 / max | words mean / p95 / max | "
          "tokens mean / p50 / p95 / max | > 77 tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, which, s in rows_len:
        ch, w, tk = s["characters"], s["words"], s["tokens"]
        print(
            f"| {name} | {which} | {s['captions']:,} | {ch['mean']} / {ch['p50']:g} / {ch['p95']:g} / {ch['max']:g} | "
            f"{w['mean']} / {w['p95']:g} / {w['max']:g} | {tk['mean']} / {tk['p50']:g} / {tk['p95']:g} / "
            f"{tk['max']:g} | {s['over_context']:,} ({s['fraction_over_context']:.2%}) |"
        )


if __name__ == "__main__":
    main()
