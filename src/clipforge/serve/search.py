"""Query an index: text -> image, image -> image, zero-shot labels; exact nearest neighbours by cosine.

Two backends rank the same way (exact maximum inner product over L2-normalized vectors, so
cosine similarity); the numpy one is the reference:

- ``faiss`` (``pip install faiss-cpu``): an ``IndexFlatIP``. Still exact, but its kernel
  computes scores block by block and keeps the top k in a heap as it goes, with SIMD and
  threads, instead of materializing all N scores per query and partitioning them; it is also
  the door to approximate indexes (IVF, HNSW) when an index reaches millions of images.
- ``numpy``: one matrix product and ``argpartition``. Always available, no native dependency
  (faiss-cpu wheels do not exist for every platform and Python), and fast enough for the
  10k-100k images an index built on a CPU machine holds (``benchmarks/bench_search.py``
  measures both).

``backend="auto"`` takes faiss when it imports and numpy otherwise. Results of both are sorted
by score, ties broken by the lower id.

An index built with an approximate type (``clipforge index --index ivf|ivfpq|hnsw``, or ``auto``
on a large collection: :mod:`clipforge.serve.ann`) is searched with :class:`AnnBackend` under
``backend="auto"`` or ``"faiss"``; ``"numpy"`` stays exact.
"""
from __future__ import annotations

import io
import logging
import mimetypes
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .ann import RERANK_MIN
from .index import (
    IndexData,
    IndexNotFoundError,
    ModelMismatchError,
    check_indexed_file,
    check_same_model,
    describe_model,
    indexed_roots,
    model_info,
    open_index,
    read_indexed_bytes,
)
from .search_batching import SEARCH_BATCH, SearchBatcher

log = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "numpy")
PLACEHOLDERS = ("{}", "{c}")
TEXT_BATCH = 256  # labels embedded per forward pass in classify: bounded memory for any number of labels


def check_template(template: str) -> str:
    """Check a zero-shot template: exactly one ``{}`` or ``{c}`` placeholder and no other brace.

    Templates may come from a request, so they are never given to ``str.format`` (whose fields
    look up attributes, ``{0.__class__}``, and pad at will, ``{:>100000000}``): the placeholder
    is replaced by the label as plain text (:func:`fill_template`). Raises ``ValueError`` naming
    the rule otherwise.
    """
    if not isinstance(template, str):
        raise ValueError(f"the template must be a string, got {type(template).__name__}")
    found = [(template.count(p), p) for p in PLACEHOLDERS]
    n = sum(c for c, _ in found)
    rest = template
    for _, p in found:
        rest = rest.replace(p, "")
    if n != 1 or "{" in rest or "}" in rest:
        what = ("no placeholder" if n == 0 else f"{n} placeholders" if n > 1
                else "other braces besides the placeholder")
        raise ValueError(f"template {template[:80]!r} has {what}: it must contain exactly one {{}} or {{c}} where the "
                         "label goes, and no other brace (e.g. 'a photo of {}.')")
    return template


def fill_template(template: str, label: str) -> str:
    """``template`` (checked by :func:`check_template`) with its placeholder replaced by ``label``, literally."""
    p = "{}" if "{}" in template else "{c}"
    before, _, after = template.partition(p)
    return before + label + after


# ---------------------------------------------------------------- backends


def _order(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by descending score, then ascending id."""
    out_s, out_i = np.empty_like(scores), np.empty_like(ids)
    for r in range(scores.shape[0]):
        o = np.lexsort((ids[r], -scores[r]))
        out_s[r], out_i[r] = scores[r, o], ids[r, o]
    return out_s, out_i


class NumpyBackend:
    """Exact search with numpy: ``queries @ vectors.T`` and a top-k partition."""

    name = "numpy"

    def __init__(self, vectors: np.ndarray):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        n = self.vectors.shape[0]
        k = min(k, n)
        if k <= 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        scores = q @ self.vectors.T
        if k < n:
            # k+1 candidates so that a tie at the boundary still resolves to the lower id after sorting
            kk = min(k + 1, n)
            part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        else:
            part = np.broadcast_to(np.arange(n), (q.shape[0], n))
        s = np.take_along_axis(scores, part, axis=1)
        s, i = _order(s, part.astype(np.int64))
        return s[:, :k], i[:, :k]


class FaissBackend:
    """Exact search with faiss ``IndexFlatIP`` (same ranking as :class:`NumpyBackend`)."""

    name = "faiss"

    def __init__(self, vectors: np.ndarray):
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        if vectors.shape[0]:
            self.index.add(vectors)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, self.index.ntotal)
        if k <= 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        kk = min(k + 1, self.index.ntotal)  # one extra, as in NumpyBackend, for ties at the boundary
        s, i = self.index.search(q, kk)
        s, i = _order(s, i.astype(np.int64))
        return s[:, :k], i[:, :k]


class AnnBackend:
    """Approximate search with a faiss IVF, IVF-PQ or HNSW index built by ``clipforge index`` (``ann.faiss``).

    Rows the index does not cover yet (``count`` in its manifest record is smaller than the
    collection: an interrupted build committed new rows) are searched exactly and merged. An
    ``ivfpq`` shortlist of ``max(shortlist, 4k)`` candidates is re-scored exactly from the stored
    (memory-mapped) embeddings, so scores are the same cosines the exact backends return.
    ``nprobe`` / ``ef_search``: the search parameter (default: the one tuned at build time).
    ``shortlist``: the least number of ``ivfpq`` candidates re-scored (default ``RERANK_MIN``, 200).
    """

    def __init__(self, index, vectors: np.ndarray, record: dict[str, Any], nprobe: int | None = None,
                 ef_search: int | None = None, shortlist: int = RERANK_MIN):
        from .ann import set_search_param

        if shortlist < 1:
            raise ValueError(f"shortlist must be >= 1, got {shortlist}")
        self.index, self.vectors, self.record, self.shortlist = index, vectors, record, int(shortlist)
        self.kind = record["spec"]["kind"]
        self.name = f"faiss-{self.kind}"
        self.covered = int(index.ntotal)
        tuned = record.get("search", {})
        if self.kind == "hnsw":
            value, given, opt = (ef_search if ef_search is not None else tuned.get("ef_search")), ef_search, "ef_search"
        else:
            value, given, opt = (nprobe if nprobe is not None else tuned.get("nprobe")), nprobe, "nprobe"
        if given is not None and int(given) < 1:
            raise ValueError(f"--{opt.replace('_', '-')} must be >= 1, got {given}")
        self.param = (opt, int(value) if value is not None else None)
        set_search_param(index, self.kind, value)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        n = len(self)
        k = min(k, n)
        if k <= 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        kk = min(k + 1, n)
        short = min(max(self.shortlist, 4 * kk), self.covered) if self.kind == "ivfpq" else min(kk, self.covered)
        s, i = self.index.search(q, short) if short > 0 else (np.zeros((len(q), 0), np.float32),
                                                              np.zeros((len(q), 0), np.int64))
        i = i.astype(np.int64)
        if self.kind == "ivfpq":  # exact scores of the shortlist from the stored vectors
            s = np.full(i.shape, -np.inf, np.float32)
            for r in range(len(q)):
                ok = i[r] >= 0
                rows = np.sort(i[r][ok])
                i[r][ok] = rows
                s[r][ok] = np.asarray(self.vectors[rows], dtype=np.float32) @ q[r]
        if self.covered < n:  # rows added after the index was last built: exact
            tail = np.asarray(self.vectors[self.covered:], dtype=np.float32)
            ts = q @ tail.T
            s = np.concatenate([s, ts], axis=1)
            i = np.concatenate([i, np.broadcast_to(np.arange(self.covered, n), ts.shape)], axis=1)
        s = np.where(i >= 0, s, -np.inf).astype(np.float32)
        s, i = _order(s, i)
        return s[:, :k], i[:, :k]


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def make_backend(vectors: np.ndarray, backend: str = "auto"):
    """A search backend over ``vectors`` [N, d]: ``faiss``, ``numpy`` or ``auto`` (faiss if installed)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got '{backend}'")
    if backend == "faiss" or (backend == "auto" and faiss_available()):
        if not faiss_available():
            raise ValueError("backend 'faiss' needs faiss: pip install faiss-cpu (or use backend 'numpy')")
        return FaissBackend(vectors)
    return NumpyBackend(vectors)


# ---------------------------------------------------------------- searcher


@dataclass
class Hit:
    """One result: the item's id (row in the index), cosine ``score``, ``key``, ``caption``, and ``path``
    (the image file; ``None`` for a corpus sample, whose ``key`` is ``NAME/SPLIT/KEY``); ``description``: the
    generated scene description a description index matched (``None`` in an image-embedding index)."""

    id: int
    score: float
    key: str
    caption: str | None
    kind: str
    path: str | None
    description: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_EXT_MIME = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
             "gif": "image/gif", "bmp": "image/bmp", "tif": "image/tiff", "tiff": "image/tiff"}


class Searcher:
    """Search an index built by ``clipforge index`` with the model that built it.

    ``model``: ``None`` loads the model recorded in the index's manifest; a path or source
    string goes through :func:`clipforge.load`; a ``(model, tokenizer, preprocess)`` tuple (what
    ``clipforge.load`` returns) is used as is. The weights are hashed and compared with the
    manifest's; a different model raises :class:`ModelMismatchError` naming both.
    ``backend``: ``auto``, ``faiss`` or ``numpy`` (see the module docstring). ``load_options``: keyword
    arguments of :func:`clipforge.load` for a model given by path (``model_name``, ``trust_pickle``, ...), as
    ``clipforge index`` took them.

    A description index (``clipforge index CAPTIONER --describe``, :mod:`clipforge.serve.describe`) is searched
    text-to-text: queries are embedded by its sentence encoder, image queries are described by its captioner
    first; ``model`` is then the captioner (default: the one recorded), or a
    :class:`~clipforge.serve.describe.Describer` and its image transform as a pair. :attr:`index_kind` says
    which kind answers (``image`` or ``describe``).

    >>> s = Searcher("indexes/emoji")                       # doctest: +SKIP
    >>> [(h.caption, round(h.score, 3)) for h in s.text("a red heart", k=3)]  # doctest: +SKIP
    """

    def __init__(self, index_dir: str | os.PathLike, model: Any = None, backend: str = "auto",
                 max_image_pixels: int | None = None, nprobe: int | None = None, ef_search: int | None = None,
                 load_options: dict[str, Any] | None = None):
        self.max_image_pixels = max_image_pixels  # None: clipforge.images' limit (CLIPFORGE_MAX_IMAGE_PIXELS, 40 M)
        self.batcher: SearchBatcher | None = None  # batch_searches() turns on coalescing of concurrent searches
        self.data: IndexData = open_index(index_dir)
        self.root = Path(index_dir)
        self._backend_choice, self._nprobe, self._ef_search = backend, nprobe, ef_search
        built = self.data.manifest["model"]
        self.describe_record = self.data.manifest.get("describe")
        if self.describe_record is not None:
            self._init_describer(model, built, load_options)
            return
        self.index_kind = "image"
        if model is None:
            source = built.get("source")
            if not source or not Path(source).exists():
                raise FileNotFoundError(
                    f"index {self.root} was built with {describe_model(built)}, which is not at that path any more; "
                    "pass the model with --model (Searcher(..., model=...)) and it will be checked against the "
                    "index's weights hash")
            model = source
        if isinstance(model, (str, os.PathLike)):
            from ..interop import load

            source = str(model)
            self.model, self.tokenizer, self.preprocess = load(source, **(load_options or {}))
        else:
            source = None
            self.model, self.tokenizer, self.preprocess = model
        self.model.eval()
        current = model_info(self.model, source)
        fix = (
            f"Serve it with the model it was built with (--model {built.get('resolved') or built.get('source')}), "
            f"or rebuild the index with this model: clipforge index {source or 'MODEL'} ... --out {self.root} --rebuild"
        )
        check_same_model(self.root, built, current, fix)
        self.model_description = describe_model(built)
        self.backend = self._backend(backend, nprobe, ef_search)
        self._lock = threading.Lock()  # one forward pass at a time: bounded memory, no thread oversubscription

    def _init_describer(self, model: Any, built: dict[str, Any], load_options: dict[str, Any] | None) -> None:
        from .describe import describer_from_record

        self.index_kind = "describe"
        rec = self.describe_record
        if isinstance(model, tuple):
            self.model, self.preprocess = model
        else:
            if model is None and rec.get("captioner") and not Path(rec["captioner"]).exists():
                raise FileNotFoundError(
                    f"description index {self.root} was described by {rec['captioner']}, which is not at that path "
                    "any more; pass the captioner with --model (its weights are checked against the index's hash)")
            self.model, self.preprocess = describer_from_record(rec, model, load_options)
        self.tokenizer = None
        self.model.eval()
        current = model_info(self.model, rec.get("captioner") if model is None else None)
        check_same_model(self.root, built, current,
                         f"Serve it with the captioner and sentence encoder it was built with, or rebuild it: "
                         f"clipforge index CAPTIONER --describe ... --out {self.root} --rebuild")
        self.model_description = (f"descriptions by {rec.get('captioner')} ({rec['method']}), "
                                  f"text-to-text with {rec['sentence_encoder_name']}")
        self.backend = self._backend(self._backend_choice, self._nprobe, self._ef_search)
        self._lock = threading.Lock()

    def describe_query_image(self, image: Any) -> str:
        """The description a description index's captioner gives an image query."""
        import torch

        from ..images import load_image

        if self.index_kind != "describe":
            raise ValueError("only a description index (clipforge index --describe) describes images")
        pixels = torch.stack([self.preprocess(load_image(image, max_pixels=self.max_image_pixels))])
        with self._lock:
            return self.model.describe(pixels)[0]

    def _backend(self, backend: str, nprobe: int | None, ef_search: int | None):
        """The index's ANN backend when it has one and faiss is wanted, else exact search (``make_backend``)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got '{backend}'")
        record = self.data.manifest.get("ann")
        if record and record["spec"]["kind"] != "flat" and backend != "numpy":
            if faiss_available():
                index = self.data.ann
                if index.ntotal != record["count"] or index.ntotal > len(self.data):
                    raise IndexNotFoundError(
                        f"index '{self.root}': ann.faiss holds {index.ntotal} vectors, the manifest says "
                        f"{record['count']} of {len(self.data)} (an interrupted write?). Rerun the `clipforge index` "
                        "command that built it, with --rebuild.")
                ann = AnnBackend(index, self.data.embeddings, record, nprobe=nprobe, ef_search=ef_search)
                log.info("index %s: %s search (%s=%s)", self.root, ann.name, *ann.param)
                return ann
            if backend == "faiss":
                raise ValueError(f"index {self.root} has a {record['spec']['kind']} index, which needs faiss: "
                                 "pip install faiss-cpu (or use --backend numpy for exact search)")
            log.warning("index %s has a %s index but faiss is not installed: searching exactly with numpy "
                        "(pip install faiss-cpu for the fast path)", self.root, record["spec"]["kind"])
        return make_backend(self.data.embeddings, backend)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def dim(self) -> int:
        return int(self.data.manifest["dim"])

    # -------------------------------------------------------- encoding

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalized text embeddings [len(texts), dim] (float32)."""
        import torch

        with self._lock, torch.no_grad():
            if self.index_kind == "describe":
                return self.model.encode_texts(list(texts))
            return self.model.encode_text(self.tokenizer(list(texts))).float().numpy()

    def encode_image(self, images: Sequence[Any]) -> np.ndarray:
        """L2-normalized image embeddings of PIL images, paths, bytes or arrays (see clipforge.images)."""
        import torch

        from ..images import load_image

        pixels = torch.stack([self.preprocess(load_image(im, max_pixels=self.max_image_pixels)) for im in images])
        with self._lock, torch.no_grad():
            return self.model.encode_image(pixels).float().numpy()

    # -------------------------------------------------------- search

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        m = self.data.meta
        return [Hit(int(i), float(s), m["key"][i], m["caption"][i], m["kind"][i],
                    m["path"][i] if m["kind"][i] == "file" else None, m["description"][i])
                for s, i in zip(scores, ids) if i >= 0]

    def vector(self, query: np.ndarray, k: int = 10) -> list[Hit]:
        """The ``k`` items nearest to an embedding (normalized here)."""
        return self.vectors(np.asarray(query, dtype=np.float32).reshape(1, -1), [k])[0]

    def vectors(self, queries: np.ndarray, ks: Sequence[int]) -> list[list[Hit]]:
        """:meth:`vector` for many embeddings [n, dim] at once, query j answered with its own ``ks[j]`` items: one
        backend call for all of them (faiss and numpy score a block of queries as one matrix product, much faster
        than n single-query searches), each query's ranking the best ``max(ks)`` cut to its ``k``."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if q.shape[1] != self.dim:
            raise ValueError(f"query has dimension {q.shape[1]}, the index {self.dim}")
        if len(ks) != q.shape[0]:
            raise ValueError(f"{q.shape[0]} queries but {len(ks)} values of k")
        if not len(ks):
            return []
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        if self.batcher is not None:  # joins the other threads' waiting queries in one backend call
            return self.batcher.search(q, [int(k) for k in ks])
        return self._search_block(q, [int(k) for k in ks])

    def _search_block(self, q: np.ndarray, ks: list[int]) -> list[list[Hit]]:
        s, i = self.backend.search(q, max(ks))
        return [self._hits(s[j, :k], i[j, :k]) for j, k in enumerate(ks)]

    def batch_searches(self, max_rows: int = SEARCH_BATCH) -> SearchBatcher:
        """From now on, searches made at the same time by several threads (a server's requests) share backend
        calls (:class:`~clipforge.serve.search_batching.SearchBatcher`); results are the same. Returns the
        batcher (its ``stats``). ``max_rows=1`` turns it off again."""
        self.batcher = SearchBatcher(self._search_block, max_rows) if max_rows > 1 else None
        return self.batcher

    def text(self, query: str, k: int = 10) -> list[Hit]:
        """Text -> image: the ``k`` images most similar to ``query``, best first."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("the text query is empty")
        return self.vector(self.encode_text([query])[0], k)

    def image(self, image: Any, k: int = 10) -> list[Hit]:
        """Image -> image: the ``k`` indexed images most similar to ``image`` (PIL image, path, bytes, array)."""
        return self.vector(self.encode_image([image])[0], k)

    def similar(self, item_id: int, k: int = 10) -> list[Hit]:
        """The ``k`` items most similar to indexed item ``item_id`` (itself excluded), from its stored embedding."""
        self._check_id(item_id)
        hits = self.vector(self.data.embeddings[item_id].astype(np.float32), k + 1)
        return [h for h in hits if h.id != item_id][:k]

    def classify(self, image: Any, labels: Sequence[str], template: str = "a photo of {}.") -> list[tuple[str, float]]:
        """Zero-shot: the probability of each label for ``image``, highest first.

        Each label replaces the one ``{}`` or ``{c}`` of ``template`` (as plain text: see
        :func:`check_template`) and is embedded, ``TEXT_BATCH`` labels per forward pass;
        probabilities are the softmax of the model's logit scale times the cosine similarities.
        """
        if self.index_kind == "describe":
            raise ValueError(f"index {self.root} is a description index (text-to-text search): it holds no image "
                             "embeddings to classify against; classify with an image-embedding index")
        check_template(template)
        labels = [str(l).strip() for l in labels if str(l).strip()]
        if not labels:
            raise ValueError("classify needs at least one label")
        img = self.encode_image([image])[0]
        texts = [fill_template(template, l) for l in labels]
        txt = np.concatenate([self.encode_text(texts[i:i + TEXT_BATCH]) for i in range(0, len(texts), TEXT_BATCH)])
        logits = float(self.model.scale().detach()) * (txt @ img)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        return sorted(zip(labels, p.astype(float).tolist()), key=lambda t: -t[1])

    # -------------------------------------------------------- items

    def _check_id(self, item_id: int) -> None:
        if not 0 <= int(item_id) < len(self):
            raise KeyError(f"no item {item_id} in this index (ids are 0..{len(self) - 1})")

    def item(self, item_id: int) -> dict[str, Any]:
        """The metadata row of one item."""
        self._check_id(item_id)
        return self.data.row(int(item_id))

    def item_stamp(self, item_id: int) -> tuple[int, int, int]:
        """``(size, mtime_ns, inode)`` of the item's file if it is still the one indexed, else ``ItemChangedError``."""
        st = check_indexed_file(self.item(item_id), indexed_roots(self.data.manifest))
        return st.st_size, st.st_mtime_ns, st.st_ino

    def image_bytes(self, item_id: int, max_side: int | None = None) -> tuple[bytes, str]:
        """The item's image as ``(bytes, mime type)``; with ``max_side``, a thumbnail (PNG or JPEG) no larger.

        Only the file the index recorded is read: one that now resolves outside the indexed folders
        or whose size or modification time changed raises ``ItemChangedError`` (a
        ``FileNotFoundError``; see :func:`clipforge.serve.index.read_indexed_bytes`).
        """
        row = self.item(item_id)
        data = read_indexed_bytes(row, indexed_roots(self.data.manifest))
        mime = _EXT_MIME.get(row["ext"]) or mimetypes.guess_type(f"x.{row['ext']}")[0] or "application/octet-stream"
        if max_side is None:
            return data, mime
        from PIL import Image

        from ..images import load_image

        img = load_image(data, max_pixels=self.max_image_pixels)
        if max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.LANCZOS)
        buf = io.BytesIO()
        if mime == "image/jpeg":
            img.save(buf, "JPEG", quality=85)
            return buf.getvalue(), "image/jpeg"
        img.save(buf, "PNG")
        return buf.getvalue(), "image/png"


__all__ = ["Searcher", "Hit", "NumpyBackend", "FaissBackend", "AnnBackend", "make_backend", "faiss_available",
           "BACKENDS",
           "ModelMismatchError"]
