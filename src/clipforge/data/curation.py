"""MetaCLIP curation: match captions against metadata entries, then balance entries to at most about ``t``.

Following "Demystifying CLIP Data" (Xu et al., 2023):

1. **Substring matching.** A caption matches an entry when the entry occurs in it as a
   substring (an Aho-Corasick automaton from ``pyahocorasick`` finds all entries in one pass).
   Captions that match no entry are dropped. Options: ``lowercase`` (default on, since the
   default entries are lowercase; MetaCLIP matches case-sensitively) and ``word_boundary``
   (default off as in MetaCLIP, where "cat" matches "category").
2. **Balancing.** With ``count(e)`` the number of matched samples per entry over the whole
   pool, a sample is kept if, for some entry ``e`` it matches, a fresh uniform draw
   ``u < t / count(e)``. Entries seen fewer than ``t`` times keep all their samples (the tail);
   frequent entries keep about ``t``.

Draws come from ``numpy.random.default_rng(seed)``: one ``rng.random(nnz)`` for all
(sample, entry) pairs, in sample order and, within a sample, in increasing entry id, so a
result can be recomputed by hand.

:func:`curate_shards` applies it to a shard directory and writes the curated shard set
(``clipforge data curate``); :func:`read_entries` reads the metadata (a file or ``builtin``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np


class EntryMatcher:
    """Finds which of ``entries`` occur in a text (Aho-Corasick)."""

    def __init__(self, entries: Sequence[str], lowercase: bool = True, word_boundary: bool = False):
        import ahocorasick

        self.lowercase, self.word_boundary = lowercase, word_boundary
        self.entries: list[str] = []
        self.automaton = ahocorasick.Automaton()
        for e in entries:
            key = e.lower() if lowercase else e
            if key and key not in self.automaton:
                self.automaton.add_word(key, (len(self.entries), len(key)))
                self.entries.append(key)
        if not self.entries:
            raise ValueError("no metadata entries to match against")
        self.automaton.make_automaton()

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, text: str) -> list[int]:
        """Sorted ids of the entries found in ``text``."""
        if self.lowercase:
            text = text.lower()
        if not self.word_boundary:
            return sorted({eid for _, (eid, _) in self.automaton.iter(text)})
        found = set()
        for end, (eid, length) in self.automaton.iter(text):
            start = end - length + 1
            if (start == 0 or not text[start - 1].isalnum()) and (end + 1 == len(text) or not text[end + 1].isalnum()):
                found.add(eid)
        return sorted(found)

    def match_all(self, texts: Sequence[str | Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """CSR matches of many samples: ``(indptr, entry_ids)``; sample ``i`` matched ``ids[indptr[i]:indptr[i+1]]``.

        A sample with several captions matches the union of its captions' entries.
        """
        indptr = np.zeros(len(texts) + 1, dtype=np.int64)
        ids: list[int] = []
        for i, t in enumerate(texts):
            if isinstance(t, str):
                ids.extend(self.match(t))
            else:
                ids.extend(sorted({e for c in t for e in self.match(c)}))
            indptr[i + 1] = len(ids)
        return indptr, np.asarray(ids, dtype=np.int64)


def entry_counts(indptr: np.ndarray, ids: np.ndarray, num_entries: int, keep: np.ndarray | None = None) -> np.ndarray:
    """Matched samples per entry (over the samples where the boolean ``keep`` is true, when given)."""
    if keep is not None:
        owner = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        ids = ids[keep[owner]]
    return np.bincount(ids, minlength=num_entries)


def balance(indptr: np.ndarray, ids: np.ndarray, counts: np.ndarray, t: float,
            rng: np.random.Generator) -> np.ndarray:
    """Boolean keep mask per sample: kept if for some matched entry ``e`` a uniform draw ``< t / counts[e]``."""
    n = len(indptr) - 1
    if len(ids) == 0:
        return np.zeros(n, dtype=bool)
    prob = t / np.maximum(counts[ids], 1)
    accept = rng.random(len(ids)) < prob
    keep = np.zeros(n, dtype=bool)
    nonempty = indptr[1:] > indptr[:-1]
    starts = indptr[:-1][nonempty]
    keep[nonempty] = np.logical_or.reduceat(accept, starts)
    return keep


@dataclass
class CurationResult:
    """The curated subset and the entry distributions before and after balancing."""

    indices: np.ndarray  # kept sample indices, increasing
    counts_before: np.ndarray  # matched samples per entry in the pool
    counts_after: np.ndarray  # matched samples per entry among the kept samples
    entries: list[str]
    t: float
    pool: int  # samples in the pool
    matched: int  # samples matching at least one entry

    def summary(self) -> dict:
        before, after = self.counts_before, self.counts_after
        head = before > self.t
        return {"pool": self.pool, "matched": self.matched, "kept": int(len(self.indices)), "t": self.t,
                "entries": len(self.entries), "entries_matched": int((before > 0).sum()),
                "head_entries": int(head.sum()),
                "head_share_before": float(before[head].sum() / max(before.sum(), 1)),
                "head_share_after": float(after[head].sum() / max(after.sum(), 1))}

    def distribution(self, top: int = 10) -> list[tuple[str, int, int]]:
        """(entry, count before, count after) for the ``top`` most frequent entries before balancing."""
        order = np.argsort(-self.counts_before, kind="stable")[:top]
        return [(self.entries[i], int(self.counts_before[i]), int(self.counts_after[i])) for i in order]


def curate(texts: Sequence[str | Sequence[str]], entries: Sequence[str] | EntryMatcher | None = None,
           t: float = 20_000, seed: int = 0, **matcher_options) -> CurationResult:
    """Match ``texts`` (a caption or a list of captions per sample) against ``entries`` and balance at ``t``.

    ``entries`` defaults to :func:`clipforge.data.entries.default_entries`. MetaCLIP used
    ``t = 20,000`` for 400M pairs; scale ``t`` with the pool (e.g. a few per cent of it).
    """
    if entries is None:
        from .entries import default_entries

        entries = default_entries()
    matcher = entries if isinstance(entries, EntryMatcher) else EntryMatcher(entries, **matcher_options)
    indptr, ids = matcher.match_all(texts)
    counts = entry_counts(indptr, ids, len(matcher))
    keep = balance(indptr, ids, counts, t, np.random.default_rng(seed))
    kept = np.nonzero(keep)[0]
    return CurationResult(
        indices=kept,
        counts_before=counts,
        counts_after=entry_counts(indptr, ids, len(matcher), keep),
        entries=list(matcher.entries),
        t=t,
        pool=len(texts),
        matched=int((indptr[1:] > indptr[:-1]).sum()),
    )


def read_entries(source: str | os.PathLike) -> list[str]:
    """Metadata entries: ``"builtin"`` (:func:`clipforge.data.entries.default_entries`) or a UTF-8 text
    file with one entry per line (blank lines and lines starting with ``#`` are skipped)."""
    if str(source) == "builtin":
        from .entries import default_entries

        return default_entries()
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"entries file '{source}' does not exist; pass a text file with one entry per line "
                                "or 'builtin' for the built-in entries")
    entries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise ValueError(f"entries file '{source}' has no entries; write one entry per line")
    return entries


def curate_shards(src: str | os.PathLike, out: str | os.PathLike, entries: Sequence[str] | EntryMatcher,
                  t: float, seed: int = 0, shard_bytes: int = 64 << 20, **matcher_options) -> dict[str, Any]:
    """Curate the ``train`` split of the shard directory ``src`` into a new shard directory ``out``.

    The train samples' captions (all of a sample's captions, read from the shard metadata without
    decoding an image) are matched and balanced by :func:`curate`; the kept samples are copied byte
    for byte (image and metadata) into shards of about ``shard_bytes``, in their stored order; the
    ``val`` and ``test`` splits are copied whole (evaluation stays comparable). The manifest keeps the
    source's label views and records the curation summary under ``"curation"``; returns the manifest."""
    from .shards import MANIFEST, SPLITS, ShardSample, ShardSetWriter, read_manifest, shard_entries

    if t <= 0:
        raise ValueError(f"the balancing threshold t must be positive, got {t}")
    src, out = Path(src).expanduser(), Path(out).expanduser()
    manifest = read_manifest(src)
    if src.resolve() == out.resolve():
        raise ValueError(f"--out must differ from the source {src}; curation writes a new shard set")
    if (out / MANIFEST).exists():
        raise ValueError(f"{out} already holds a shard set; remove it or choose another --out")
    split_entries = {s: [(src / sh["file"], e) for sh in manifest["splits"][s]["shards"]
                         for e in shard_entries(src / sh["file"])]
                     for s in SPLITS if s in manifest["splits"]}
    train = split_entries.get("train", [])
    if not train:
        raise ValueError(f"{src} has no train samples to curate")
    result = curate([list(e.meta.get("captions", [])) for _, e in train], entries, t=t, seed=seed, **matcher_options)
    if len(result.indices) == 0:
        raise ValueError(f"no train caption of {src} matches any of the {len(result.entries)} entries; "
                         "use entries that occur in the captions")
    chosen = {"train": [train[i] for i in result.indices.tolist()]}
    chosen |= {s: v for s, v in split_entries.items() if s != "train"}
    writer = ShardSetWriter(out, shard_bytes)
    for split, items in chosen.items():
        by_key = {e.key: (path, e) for path, e in items}

        def produce(keys: Sequence[str], by_key=by_key, split=split):
            for key in keys:
                path, e = by_key[key]
                with open(path, "rb") as f:
                    f.seek(e.offset)
                    image = f.read(e.size)
                extra = {k: v for k, v in e.meta.items() if k not in ("captions", "labels", "label", "split")}
                yield ShardSample(key, image, list(e.meta.get("captions", [])), dict(e.meta.get("labels", {})),
                                  e.ext, extra)

        writer.write_split(split, [e.key for _, e in items], produce)
    info = {k: v for k, v in manifest.items() if k not in ("name", "format", "label_views", "splits", "total")}
    summary = result.summary() | {"seed": seed, "source": str(src.resolve())}
    return writer.finish(f"{manifest['name']}-curated", manifest["label_views"], info=info | {"curation": summary})
