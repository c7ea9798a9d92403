"""Caption noise: captions with injected wrong or irrelevant words, for noise-robust training (GA-DMS).

Web captions describe their image only in part: some words are wrong (a color or object the image
does not show) and some are irrelevant (words about nothing in the image). GA-DMS (Zheng et al.,
"Gradient-Attention Guided Dual-Masking Synergetic Framework for Robust Text-based Person
Retrieval", EMNLP 2025) trains on such captions; :class:`NoisyCaptions` makes a ``shapes`` (or any
captioned) dataset noisy in a controlled way so the effect can be measured.

For each sample, with probability ``rate`` (drawn from ``(seed, index)``, so the same every epoch)
every caption of the sample is corrupted by :func:`noisy_caption`:

- ``wrong``: one attribute or object word becomes a wrong one (the rule generators of
  :mod:`clipforge.data.negatives`: ``replace_attribute``, else ``replace_object``), never a word that
  is true of the image (the words of the sample's region captions, when it has them, are avoided);
- ``irrelevant``: ``irrelevant_words`` words from :data:`IRRELEVANT` are inserted at random word
  positions (before the final period).

The clean captions stay in the item as ``clean_captions``; the item gains ``caption_noise`` (True
for a corrupted sample). Only the training set is wrapped: evaluation runs on clean captions.
"""
from __future__ import annotations

import zlib
from typing import Any, Iterable

import numpy as np

from .negatives import replace_attribute, replace_object

NOISE_KINDS = ("wrong", "irrelevant")
# words that say nothing about a rendered scene: web-caption filler, photo metadata, stray topics
IRRELEVANT = ("stock", "photo", "free", "download", "vintage", "wallpaper", "hd", "best", "cheap", "online",
              "summer", "party", "wedding", "kitchen", "garden", "beautiful", "new", "sale", "logo", "style")


def noisy_caption(caption: str, rng: np.random.Generator, kinds: Iterable[str] = NOISE_KINDS,
                  irrelevant_words: int = 2, avoid: Iterable[str] = ()) -> str:
    """``caption`` with the noise of each kind in ``kinds`` applied (module docstring). A ``wrong``
    replacement that does not apply (no attribute or object word) leaves the words as they are."""
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(NOISE_KINDS))
    if unknown:
        raise ValueError(f"unknown caption noise kind(s) {unknown}; choose from {NOISE_KINDS}")
    out = caption
    if "wrong" in kinds:
        avoid = list(avoid)
        out = replace_attribute(out, rng, avoid) or replace_object(out, rng, avoid) or out
    if "irrelevant" in kinds and irrelevant_words > 0:
        end = "." if out.endswith(".") else ""
        words = (out[:-1] if end else out).split()
        for _ in range(irrelevant_words):
            words.insert(int(rng.integers(len(words) + 1)), IRRELEVANT[int(rng.integers(len(IRRELEVANT)))])
        out = " ".join(words) + end
    return out


class NoisyCaptions:
    """Wraps a map-style dataset: a fraction ``rate`` of its samples get noisy captions (module docstring)."""

    def __init__(self, dataset, rate: float, kinds: Iterable[str] = NOISE_KINDS, irrelevant_words: int = 2,
                 seed: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"caption noise rate must be in [0, 1] (the fraction of samples whose captions are "
                             f"corrupted), got {rate}")
        kinds = tuple(kinds)
        unknown = sorted(set(kinds) - set(NOISE_KINDS))
        if unknown or not kinds:
            raise ValueError(f"caption noise kinds must be a non-empty subset of {NOISE_KINDS}, got {list(kinds)}")
        self.dataset, self.rate, self.kinds = dataset, float(rate), kinds
        self.irrelevant_words, self.seed = int(irrelevant_words), int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        rng = np.random.default_rng([self.seed, int(index), zlib.crc32(b"caption_noise")])
        noisy = bool(rng.random() < self.rate)
        captions = item["captions"] if not isinstance(item["captions"], str) else [item["captions"]]
        item["clean_captions"], item["caption_noise"] = list(captions), noisy
        if noisy:
            # words true of the image: its region captions' (shapes: every object's size, color and shape)
            avoid = [w.strip(".,").lower() for c in item.get("region_captions") or () for w in c.split()]
            item["captions"] = [noisy_caption(c, rng, self.kinds, self.irrelevant_words, avoid) for c in captions]
        return item

    def __getattr__(self, name):  # label_views, classnames, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
