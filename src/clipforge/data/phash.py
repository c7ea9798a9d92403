"""Perceptual difference hashes (dHash) and near-duplicate search, in NumPy.

dHash: the image in grayscale, resized to ``(hash_size + 1) x hash_size`` with Lanczos, one bit
per horizontally adjacent pair (is the right pixel brighter than the left?). Near duplicates
(re-exports, recolors, small edits of one drawing) differ in a few of the 64 bits.

The horizontal hash alone is blind to anything without horizontal gradients: a flag of
horizontal stripes hashes to all zeros, like a blank page. :func:`dhash_hv` therefore adds the
vertical dHash (the same on the transposed image): 128 bits, as two uint64 words, which is what
the split leakage control uses. Hash arrays below are uint64 of shape ``(n,)`` or ``(n, words)``.

Why our own and not the ``imagehash`` package: dHash is a few lines, and ``imagehash`` would
bring SciPy and PyWavelets into the dependencies for a function we use alone. The bits are the
same as ``imagehash.dhash`` (a test compares them where that package is installed).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ..images import load_image


def dhash(image: Any, hash_size: int = 8) -> int:
    """The ``hash_size**2``-bit difference hash of ``image`` (anything :func:`load_image` accepts) as an int."""
    gray = load_image(image).convert("L").resize((hash_size + 1, hash_size), Image.LANCZOS)
    px = np.asarray(gray, dtype=np.int16)
    bits = (px[:, 1:] > px[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def dhash_hv(image: Any, hash_size: int = 8) -> tuple[int, int]:
    """(horizontal, vertical) dHash: the second is :func:`dhash` of the transposed image."""
    img = load_image(image)
    return dhash(img, hash_size), dhash(img.transpose(Image.Transpose.TRANSPOSE), hash_size)


def _distances(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances (uint16) between two hash arrays, word by word to keep memory small."""
    if q.ndim == 1:
        return np.bitwise_count(q[:, None] ^ r[None, :]).astype(np.uint16)
    d = np.zeros((len(q), len(r)), dtype=np.uint16)
    for w in range(q.shape[1]):
        d += np.bitwise_count(q[:, None, w] ^ r[None, :, w])
    return d


def as_hash_array(hashes: Any) -> np.ndarray:
    """Python ints or tuples of ints (up to 64 bits each) as a uint64 array of shape (n,) or (n, words)."""
    if isinstance(hashes, np.ndarray):
        return hashes.astype(np.uint64)
    return np.array([tuple(int(w) for w in h) if isinstance(h, (tuple, list)) else int(h) for h in hashes],
                    dtype=np.uint64)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return int(a ^ b).bit_count()


def near_pairs(query: np.ndarray, reference: np.ndarray, max_distance: int, chunk: int = 2048) -> np.ndarray:
    """Pairs ``(i, j)`` with Hamming distance ``<= max_distance`` between ``query[i]`` and ``reference[j]``.

    Exhaustive (no index): 7,500 x 7,500 hashes take about a second.
    """
    query, reference = as_hash_array(query), as_hash_array(reference)
    out = []
    for lo in range(0, len(query), chunk):
        d = _distances(query[lo : lo + chunk], reference)
        i, j = np.nonzero(d <= max_distance)
        out.append(np.stack([i + lo, j], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def min_distances(query: np.ndarray, reference: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """For each query hash, the smallest Hamming distance to any reference hash (2**30 when there is none)."""
    query, reference = as_hash_array(query), as_hash_array(reference)
    if len(reference) == 0:
        return np.full(len(query), 1 << 30, dtype=np.int64)
    out = [_distances(query[lo : lo + chunk], reference).min(axis=1) for lo in range(0, len(query), chunk)]
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)
