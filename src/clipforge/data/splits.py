"""Deterministic train/val/test splits with leakage control.

1. :func:`hash_split` puts each sample in a split by a hash of a stable string (its source path),
   so a sample keeps its split when the corpus grows or is rebuilt elsewhere.
2. :func:`control_leakage` then groups near-duplicate images (perceptual hash within a Hamming
   distance, transitively) and moves every group that touches ``train`` wholly into ``train``;
   a group spread over val and test goes to the split of its member with the smallest key. After
   it, no val or test image has a near duplicate in train, and val and test share none.
3. :func:`caption_overlap` reports exact caption strings that occur in train and in val/test
   (titles such as "Baby Tux" recur for different drawings; they are reported, not moved).
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Sequence

import numpy as np

from .phash import as_hash_array, near_pairs

DEFAULT_FRACTIONS = {"val": 0.1, "test": 0.1}


def hash_split(key: str, fractions: dict[str, float] = DEFAULT_FRACTIONS, salt: str = "clipforge-split-v1") -> str:
    """``val``/``test``/``train`` for ``key``: a uniform draw in [0, 1) from SHA-1 of ``salt + key``."""
    u = int.from_bytes(hashlib.sha1(f"{salt}:{key}".encode()).digest()[:8], "big") / 2.0**64
    lo = 0.0
    for split, frac in fractions.items():
        if lo <= u < lo + frac:
            return split
        lo += frac
    return "train"


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def control_leakage(keys: Sequence[str], splits: Sequence[str], hashes: Sequence, max_distance: int = 8,
                    ) -> tuple[list[str], dict]:
    """Reassign splits so near-duplicate groups never straddle splits; returns (new splits, report).

    ``hashes``: one int, or tuple of ints (e.g. :func:`clipforge.data.phash.dhash_hv`), per sample.

    The report counts near-duplicate pairs, groups, and samples moved (by ``from->to``).
    """
    n = len(keys)
    h = as_hash_array(hashes)
    pairs = near_pairs(h, h, max_distance)
    pairs = pairs[pairs[:, 0] < pairs[:, 1]]
    uf = _UnionFind(n)
    for a, b in pairs:
        uf.union(int(a), int(b))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(uf.find(i), []).append(i)
    new = list(splits)
    moved: Counter = Counter()
    for members in groups.values():
        if len(members) == 1:
            continue
        present = {splits[i] for i in members}
        if len(present) == 1:
            continue
        target = "train" if "train" in present else splits[min(members, key=lambda i: keys[i])]
        for i in members:
            if new[i] != target:
                moved[f"{new[i]}->{target}"] += 1
                new[i] = target
    sizes = [len(m) for m in groups.values() if len(m) > 1]
    report = {"max_distance": max_distance, "near_duplicate_pairs": int(len(pairs)),
              "near_duplicate_groups": len(sizes), "largest_group": max(sizes, default=1),
              "moved": dict(sorted(moved.items())), "before": dict(Counter(splits)), "after": dict(Counter(new))}
    return new, report


def caption_overlap(captions: Sequence[Sequence[str]], splits: Sequence[str], examples: int = 10) -> dict:
    """Exact captions shared between train and each held-out split: counts and a few examples."""
    train = {c for caps, s in zip(captions, splits) if s == "train" for c in caps}
    out = {}
    for held in sorted(set(splits) - {"train"}):
        caps = [c for cs, s in zip(captions, splits) if s == held for c in cs]
        shared = [c for c in caps if c in train]
        samples = sum(1 for cs, s in zip(captions, splits) if s == held and any(c in train for c in cs))
        out[held] = {"captions": len(caps), "captions_also_in_train": len(shared),
                     "samples_with_a_train_caption": samples,
                     "examples": [c for c, _ in Counter(shared).most_common(examples)]}
    return out
