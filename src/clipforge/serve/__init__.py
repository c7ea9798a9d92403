"""Image search over an index of CLIP embeddings: build it, query it from Python, serve it over HTTP.

- :mod:`clipforge.serve.index`: the index on disk (embeddings, metadata, manifest) and its
  incremental builder (``clipforge index``).
- :mod:`clipforge.serve.search`: :class:`Searcher` (text -> image, image -> image, similar
  items, zero-shot labels) over exact faiss or numpy search.
- :mod:`clipforge.serve.app`: the FastAPI application and its HTML page (``clipforge serve``).

A program built on the library core (models, data, tokenizer, transforms) and ``clipforge.interop``;
the core never imports it.
"""
from __future__ import annotations

from .index import (
                    BuildReport,
                    IndexNotFoundError,
                    ModelMismatchError,
                    build_index,
                    open_index,
                    scan_corpus,
                    scan_folders,
                    weights_sha256,
)
from .search import Hit, Searcher, faiss_available, make_backend

__all__ = ["Searcher", "Hit", "build_index", "open_index", "scan_folders", "scan_corpus", "weights_sha256",
           "BuildReport", "IndexNotFoundError", "ModelMismatchError", "make_backend", "faiss_available"]
