"""Embedding cache: re-running an evaluation suite does not re-encode.

Embeddings are stored per model and per input set, as safetensors files under
``<root>/<model fingerprint>/<key hash>.safetensors``. The model fingerprint hashes the
model's configuration and every weight, so a retrained or fine-tuned model (even one step
later, in the same run directory) never reads another model's embeddings. The key names the
input set: a dataset spec (name, split, size, seed, image size, corruption) for images, the
exact list of strings for texts. Files are written to a temporary name and renamed, so an
interrupted run never leaves a half-written entry.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

DEFAULT_ROOT = Path(os.environ.get("CLIPFORGE_CACHE", Path.home() / ".cache" / "clipforge")) / "embeddings"


def model_fingerprint(model) -> str:
    """SHA-256 over the model's config and all of its tensors (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        h.update(repr(cfg).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class EmbeddingCache:
    """Get-or-compute of embedding tensors for one model. ``root=None`` disables the cache."""

    def __init__(self, model, root: str | Path | None = DEFAULT_ROOT):
        self.root = None if root is None else Path(root) / model_fingerprint(model)[:24]
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.root / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")

    def get(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        if self.root is None:
            self.misses += 1
            return compute()
        from safetensors.torch import load_file, save_file

        path = self._path(key)
        if path.exists():
            try:
                self.hits += 1
                return load_file(str(path))["embeddings"]
            except Exception:  # a damaged entry (disk full, foreign file): recompute and overwrite it
                self.hits -= 1
        self.misses += 1
        value = compute().float().contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"embeddings": value}, str(tmp), metadata={"key": key[:4000]})
        os.replace(tmp, path)
        return value

    def texts(self, texts: Sequence[str], compute: Callable[[], Tensor]) -> Tensor:
        digest = hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()
        return self.get(f"texts:{len(texts)}:{digest}", compute)

    def images(self, spec: str, compute: Callable[[], Tensor]) -> Tensor:
        return self.get(f"images:{spec}", compute)
