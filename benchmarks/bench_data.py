"""Data-layer speed: MetaCLIP curation at scale, and loader throughput on the built openclipart shards.

Curation: ``--captions`` synthetic captions (default 1,000,000) against ``--entries`` synthetic
entries (default 100,000). Entries are distinct pseudo-words; each caption holds 4-12 words
drawn from a Zipf(1.1) law over the entries mixed with filler words, so entry frequencies are
long-tailed as in real alt-text. Times: building the Aho-Corasick automaton, matching, and
balancing at ``t``.

Loader: images decoded from the shards and augmented (random resized crop + color jitter, the
training transform) to 64 and 224 px, through a ``DataLoader`` with ``--workers`` workers
(default 2), in images per second after one warm-up batch.

    python benchmarks/bench_data.py [--captions 1000000] [--entries 100000] [--t 200] \
        [--root ~/.cache/clipforge/data/openclipart] [--workers 2] [--images 2048]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def synthetic_corpus(num_captions: int, num_entries: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    entries = set()
    while len(entries) < num_entries:
        lengths = rng.integers(4, 10, num_entries)
        for n in lengths:
            entries.add("".join(rng.choice(letters, n)))
            if len(entries) == num_entries:
                break
    entries = sorted(entries)
    filler = ["a", "the", "of", "with", "in", "on", "and", "photo", "picture", "image"]
    ranks = np.minimum(rng.zipf(1.1, size=num_captions * 12), num_entries) - 1
    order = rng.permutation(num_entries)  # which entry has which rank
    lengths = rng.integers(4, 13, num_captions)
    is_filler = rng.random(int(lengths.sum())) < 0.5
    fill_pick = rng.integers(0, len(filler), int(lengths.sum()))
    captions, pos = [], 0
    for n in lengths:
        words = [filler[fill_pick[pos + j]] if is_filler[pos + j] else entries[order[ranks[pos + j]]] for j in range(n)]
        captions.append(" ".join(words))
        pos += n
    return captions, entries


def bench_curation(num_captions: int, num_entries: int, t: float) -> list[list]:
    from clipforge.data.curation import EntryMatcher, balance, entry_counts

    t0 = time.perf_counter()
    captions, entries = synthetic_corpus(num_captions, num_entries)
    gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    matcher = EntryMatcher(entries)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    indptr, ids = matcher.match_all(captions)
    match = time.perf_counter() - t0
    t0 = time.perf_counter()
    counts = entry_counts(indptr, ids, len(matcher))
    keep = balance(indptr, ids, counts, t, np.random.default_rng(0))
    after = entry_counts(indptr, ids, len(matcher), keep)
    bal = time.perf_counter() - t0
    head = counts > t
    return [
        ["synthetic corpus generation (not curation)", f"{gen:.1f} s", ""],
        ["automaton build", f"{build:.2f} s", f"{num_entries:,} entries"],
        ["matching", f"{match:.1f} s", f"{num_captions / match:,.0f} captions/s; {len(ids):,} matches"],
        [
            "balancing + distributions",
            f"{bal:.2f} s",
            f"kept {int(keep.sum()):,} of {int((np.diff(indptr) > 0).sum()):,} "
            f"matched; head entries (> t={t:g}): {int(head.sum()):,}, "
            f"their share {counts[head].sum() / counts.sum():.1%} -> "
            f"{after[head].sum() / max(after.sum(), 1):.1%}",
        ],
    ]


class _Augmented:
    """Decode from the shards, then the training transform at ``size`` (picklable for workers)."""

    def __init__(self, dataset, size: int):
        from clipforge.transforms import image_transform

        self.dataset, self.transform = dataset, image_transform(size, is_train=True)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        import torch

        item = self.dataset[i]
        return self.transform(item["image"], generator=torch.Generator().manual_seed(i))


def bench_loader(root: str | None, workers: int, images: int, batch: int = 64) -> list[list]:
    from corpus_setup import ensure_corpus
    from torch.utils.data import DataLoader

    from clipforge.data import build_dataset

    root = ensure_corpus("openclipart", root)
    rows = []
    for size in (64, 224):
        ds = build_dataset("openclipart", split="train", size=images + batch, seed=0, image_size=None, root=root)
        loader = DataLoader(_Augmented(ds, size), batch_size=batch, num_workers=workers, shuffle=False)
        it = iter(loader)
        next(it)  # workers started, first batch done
        t0 = time.perf_counter()
        n = 0
        for x in it:
            n += x.shape[0]
        dt = time.perf_counter() - t0
        rows.append(
            [f"{size} px", workers, n, f"{n / dt:,.0f}", str(tuple(x.shape[1:])), str(x.dtype).replace("torch.", "")]
        )
        del it, loader
    return rows


def main() -> None:
    from clipforge.cli.common import table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=1_000_000)
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--t", type=float, default=200)
    p.add_argument("--root", help="openclipart shard directory (default: the data home)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--skip-curation", action="store_true")
    p.add_argument("--skip-loader", action="store_true")
    args = p.parse_args()
    if not args.skip_curation:
        print(f"### MetaCLIP curation: {args.captions:,} captions x {args.entries:,} entries, t={args.t:g}\n")
        print(table(bench_curation(args.captions, args.entries, args.t), ["step", "time", "notes"]))
        print()
    if not args.skip_loader:
        print(f"### Loader: openclipart shards, decode + train augmentation, {args.workers} DataLoader workers\n")
        print(
            table(
                bench_loader(args.root, args.workers, args.images),
                ["size", "workers", "images", "images/s", "shape", "dtype"],
            )
        )


if __name__ == "__main__":
    main()
