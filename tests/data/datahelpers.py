"""Small deterministic image-caption items shared by the data-layer tests."""
from __future__ import annotations

import numpy as np
import torch


def make_items(n: int = 6, size: int = 16, seed: int = 0) -> list[dict]:
    """``n`` random RGB images with 1-3 captions each (one non-ASCII) and two label views."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        pixels = torch.from_numpy(rng.integers(0, 256, (3, size, size + i), dtype=np.uint8))
        captions = [f"picture number {i}", f"a thing, \"quoted\"\tand tabbed {i}", "émoji ☃ 雪"][: 1 + i % 3]
        items.append({"key": f"s{i:03d}", "image": pixels, "captions": captions,
                      "labels": {"kind": i % 3, "parity": i % 2}})
    return items
