"""Fixtures for evaluating on user data: a small random model saved to disk, and tiny image folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SMALL = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
         "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}}


@pytest.fixture(scope="session")
def small_model():
    import clipforge

    torch.manual_seed(0)
    model = clipforge.create_model("tiny", **SMALL).eval()
    # Redraw the weight matrices with std 0.5: at the default init every image lands on the same
    # class and retrieval is at zero, which would let a wrong metric pass; here embeddings spread out.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture(scope="session")
def small_tokenizer(small_model):
    from clipforge.tokenizer import get_tokenizer

    return get_tokenizer(small_model.context_length)


@pytest.fixture(scope="session")
def small_model_dir(small_model, tmp_path_factory):
    from clipforge.models import save_model

    return save_model(small_model, tmp_path_factory.mktemp("model") / "model")


def make_folder(root: Path, classes: list[str], per_class: int, seed: int = 0) -> Path:
    """Random-noise PNGs of varied sizes in ``root/<class>/``."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def make_image_folder():
    """:func:`make_folder`, for test modules (tests/ is not a package)."""
    return make_folder
