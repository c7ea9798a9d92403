"""Approximate nearest-neighbour indexes (faiss) for collections of millions: choice, build, tuning, search.

``clipforge index --index auto`` (the default) picks the index type and its parameters from the
collection size ``n``, the dimension ``d`` and a memory budget (``--max-memory``), in the spirit
of autofaiss (``get_optimal_index_keys_v2``: flat for small collections, HNSW when its graph and
vectors fit the budget, else IVF with product quantization, the largest code that fits). The
rules, in order (``choose_index``):

1. ``n < FLAT_BELOW`` (20,000): ``flat``, exact search (a few ms per query at most), when it fits.
2. ``n < HNSW_BELOW`` (1,000,000) and the HNSW graph with its float32 vectors fits: ``hnsw``
   (M=32). Above a million vectors an HNSW build takes too long on a CPU machine.
3. the float32 vectors in inverted lists fit: ``ivf`` (IVF-Flat), exact scores inside the lists.
4. ``ivfpq``: IVF with an 8-bit product quantizer, the largest code (``d/4``, ``d/8``, ... bytes per
   vector) that fits; its shortlist is re-ranked with exact scores from the memory-mapped
   embeddings (``embeddings.npy``, read row by row, never loaded whole).
5. nothing fits: :class:`IndexBudgetError` naming the smallest budget that would do.

IVF uses ``nlist`` = the power of two nearest ``sqrt(n)`` (at least 16) lists (autofaiss takes
4-16 x sqrt(n); fewer lists train faster on a CPU, and the tuned ``nprobe`` makes up the recall),
trained by 15 k-means iterations on a sample of at most ``TRAIN_MAX`` rows; the product
quantizer trains on at most 64 x 256 of them, without polysemous training. The search parameter
(``nprobe`` for IVF, ``efSearch`` for HNSW) is chosen at build time as the smallest one whose
recall@10 against exact search reaches the target (0.95) on ``TUNE_QUERIES`` queries drawn near
stored vectors; it is stored in the manifest and can be overridden at search time.

Memory estimates (bytes; what the index holds in RAM, ``embeddings.npy`` excluded):
flat ``4nd``; hnsw ``n(4d + 8M)``; ivf ``n(4d + 8) + 4 nlist d``; ivfpq ``n(m + 8) + 4 nlist d + 4*256 d``.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
ANN_FILE = "ann.faiss"
FLAT_BELOW = 20_000
HNSW_BELOW = 1_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
DEFAULT_MAX_MEMORY = 4 << 30
RECALL_TARGET = 0.95
TUNE_QUERIES = 200
TRAIN_MAX = 100_000
CHUNK = 65_536
KMEANS_ITERATIONS = 15  # IVF and PQ k-means (faiss's default is 25; recall moves by less than the tuning step)
PQ_POINTS_PER_CENTROID = 64  # each PQ part trains on at most 64 x 256 points (faiss's default 256 x 256)
MIN_TRAIN_PQ = 1_000  # below this many vectors a product quantizer cannot be trained (256 centroids per part)
# ivfpq shortlist: max(RERANK_MIN, 4k) candidates re-scored exactly. On 869,228 real sentence embeddings (MiniLM,
# IVF1024,PQ96x8, nprobe 64) 100 candidates held recall@10 at 0.949 of IVF-Flat's 0.958 at the same nprobe, 200 at
# 0.956 (400: 0.957) for about 0.2 ms more per query there, 0.4-0.6 ms on 1M x 512 synthetic vectors
# (docs/performance.md, "All 869,428 changelog lines"; benchmarks/bench_search_shortlist.py sweeps it)
RERANK_MIN = 200
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
EF_SEARCHES = (16, 32, 64, 128, 256, 512, 1024)


class IndexBudgetError(ValueError):
    """No index type (or not the one asked for) holds the collection in the memory budget."""


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_memory(text: str | int | float) -> int:
    """Bytes from ``2GB``, ``512MB``, ``1.5G``, ``300000000`` (binary units: 1 GB = 2**30 bytes)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"--max-memory {text!r} is not a size: write a number with an optional unit, "
                             "e.g. 2GB, 512MB or 1.5G")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"--max-memory must be positive, got {text!r} (e.g. 2GB)")
    return int(value)


def human(nbytes: float) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"


def n_lists(n: int) -> int:
    """IVF lists for ``n`` vectors: the power of two nearest sqrt(n), at least 16, at most n // 39."""
    nlist = 2 ** round(math.log2(max(math.sqrt(max(n, 1)), 1)))
    return int(max(16, min(nlist, max(n // 39, 16))))


def pq_codes(d: int) -> list[int]:
    """Product-quantizer code sizes tried, largest first: d/4, d/8, ... bytes per vector (divisors of d)."""
    return [d // f for f in (4, 8, 16, 32, 64) if d % f == 0 and d // f >= 1]


def estimate_memory(kind: str, n: int, d: int, nlist: int = 0, m: int = 0, hnsw_m: int = HNSW_M) -> int:
    """Bytes the index of ``kind`` holds in RAM for ``n`` vectors of dimension ``d`` (see the module docstring)."""
    if kind == "flat":
        return 4 * n * d
    if kind == "hnsw":
        return n * (4 * d + 8 * hnsw_m)
    if kind == "ivf":
        return n * (4 * d + 8) + 4 * nlist * d
    if kind == "ivfpq":
        return n * (m + 8) + 4 * nlist * d + 4 * 256 * d
    raise ValueError(f"unknown index type {kind!r}; choose one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class AnnSpec:
    """An index type with its build parameters, its memory estimate and why it was chosen."""

    kind: str
    n: int
    d: int
    nlist: int = 0
    m: int = 0
    hnsw_m: int = 0
    memory: int = 0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def factory(self) -> str:
        return {"flat": "Flat", "hnsw": f"HNSW{self.hnsw_m},Flat", "ivf": f"IVF{self.nlist},Flat",
                "ivfpq": f"IVF{self.nlist},PQ{self.m}x8"}[self.kind]


def _spec(kind: str, n: int, d: int, budget: int) -> AnnSpec | None:
    """The ``kind`` index for n x d within ``budget``, or None when it does not fit."""
    nlist = n_lists(n) if kind in ("ivf", "ivfpq") else 0
    if kind == "ivfpq":
        if n < MIN_TRAIN_PQ:
            return None
        for m in pq_codes(d):
            mem = estimate_memory(kind, n, d, nlist, m)
            if mem <= budget:
                return AnnSpec(kind, n, d, nlist=nlist, m=m, memory=mem)
        return None
    hnsw_m = HNSW_M if kind == "hnsw" else 0
    mem = estimate_memory(kind, n, d, nlist, hnsw_m=hnsw_m)
    return AnnSpec(kind, n, d, nlist=nlist, hnsw_m=hnsw_m, memory=mem) if mem <= budget else None


def _smallest_need(n: int, d: int) -> int:
    needs = [estimate_memory("flat", n, d)]
    if n >= MIN_TRAIN_PQ and pq_codes(d):
        needs.append(estimate_memory("ivfpq", n, d, n_lists(n), pq_codes(d)[-1]))
    return min(needs)


def choose_index(n: int, d: int, max_memory: int | str | None = None, kind: str = "auto") -> AnnSpec:
    """The index for ``n`` vectors of dimension ``d`` within ``max_memory`` bytes (default 4 GB).

    ``kind="auto"`` follows the rules of the module docstring; another kind is checked against
    the budget. Raises :class:`IndexBudgetError` naming the memory needed and the fixes.
    """
    if kind not in KINDS:
        raise ValueError(f"--index {kind!r} is not an index type; choose one of {', '.join(KINDS)}")
    if n < 0 or d < 1:
        raise ValueError(f"a collection of {n} vectors of dimension {d} cannot be indexed")
    budget = DEFAULT_MAX_MEMORY if max_memory is None else parse_memory(max_memory)
    flat_bytes = estimate_memory("flat", n, d)
    what = f"{n:,} vectors of dimension {d} ({human(flat_bytes)} as float32)"
    if kind != "auto":
        spec = _spec(kind, n, d, budget)
        if spec is None:
            if kind == "ivfpq" and n < MIN_TRAIN_PQ:
                raise IndexBudgetError(f"--index ivfpq needs at least {MIN_TRAIN_PQ:,} vectors to train its quantizer, "
                                       f"the collection has {n:,}: use --index flat (or auto)")
            need = (estimate_memory("ivfpq", n, d, n_lists(n), pq_codes(d)[-1]) if kind == "ivfpq"
                    else _spec(kind, n, d, 1 << 62).memory)
            raise IndexBudgetError(
                f"--index {kind} needs {human(need)} for {what}, more than --max-memory {human(budget)}: "
                f"raise --max-memory to at least {human(need)}, or use --index auto to pick a type that fits")
        return AnnSpec(**{**spec.to_dict(), "reason": f"--index {kind} asked for; {human(spec.memory)} of "
                                                        f"{human(budget)} for {what}"})
    tried = []
    if n < FLAT_BELOW:
        spec = _spec("flat", n, d, budget)
        if spec is not None:
            return _why(spec, f"fewer than {FLAT_BELOW:,} vectors: exact search is fast enough", budget, what)
        tried.append(f"flat needs {human(flat_bytes)}")
    if n < HNSW_BELOW:
        spec = _spec("hnsw", n, d, budget)
        if spec is not None:
            return _why(spec, f"fewer than {HNSW_BELOW:,} vectors and the HNSW graph fits", budget, what)
        tried.append(f"hnsw needs {human(estimate_memory('hnsw', n, d))}")
    spec = _spec("ivf", n, d, budget)
    if spec is not None:
        return _why(spec, "the float32 vectors fit in inverted lists" + (f" ({'; '.join(tried)})" if tried else ""),
                    budget, what)
    tried.append(f"ivf needs {human(estimate_memory('ivf', n, d, n_lists(n)))}")
    spec = _spec("ivfpq", n, d, budget)
    if spec is not None:
        return _why(spec, f"only product-quantized codes fit ({'; '.join(tried)}); the largest code that fits "
                          f"({spec.m} bytes per vector)", budget, what)
    need = _smallest_need(n, d)
    raise IndexBudgetError(
        f"no index type holds {what} in --max-memory {human(budget)}: the smallest "
        f"({'ivfpq with ' + str(pq_codes(d)[-1]) + '-byte codes' if need < flat_bytes else 'flat'}) needs "
        f"{human(need)}. Raise --max-memory to at least {human(need)}, or index fewer images")


def _why(spec: AnnSpec, rule: str, budget: int, what: str) -> AnnSpec:
    reason = f"auto: {spec.kind} ({spec.factory()}) for {what}: {rule}; {human(spec.memory)} of {human(budget)}"
    return AnnSpec(**{**spec.to_dict(), "reason": reason})


# ---------------------------------------------------------------- building


def chunks(vectors: np.ndarray, start: int = 0, size: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """``(offset, float32 block)`` over rows ``start..`` of a (memory-mapped) array, one block at a time."""
    for s in range(start, vectors.shape[0], size):
        yield s, np.ascontiguousarray(vectors[s:s + size], dtype=np.float32)


def train_sample(vectors: np.ndarray, spec: AnnSpec, seed: int = 0) -> np.ndarray:
    """Rows to train IVF/PQ on: all if few, else a sorted random sample (read from the memory map)."""
    n = vectors.shape[0]
    want = min(n, TRAIN_MAX, max(64 * spec.nlist, 256 * 40 if spec.kind == "ivfpq" else 0))
    if want >= n:
        return np.ascontiguousarray(vectors[:], dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=want, replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def build(vectors: np.ndarray, spec: AnnSpec):
    """A trained faiss index of ``spec`` holding every row of ``vectors`` (read block by block)."""
    import faiss

    if spec.kind == "flat":
        raise ValueError("a flat index is not stored: search it exactly (FaissBackend / NumpyBackend)")
    index = faiss.index_factory(spec.d, spec.factory(), faiss.METRIC_INNER_PRODUCT)
    if spec.kind == "hnsw":
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if spec.kind in ("ivf", "ivfpq"):
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.niter = KMEANS_ITERATIONS
        if spec.kind == "ivfpq":  # polysemous training (on by default from index_factory) costs ~7x the PQ training
            ivf.do_polysemous_training = False
            ivf.pq.cp.niter = KMEANS_ITERATIONS
            ivf.pq.cp.max_points_per_centroid = PQ_POINTS_PER_CENTROID
    if not index.is_trained:
        sample = train_sample(vectors, spec)
        log.info("training %s on %d of %d vectors", spec.factory(), len(sample), vectors.shape[0])
        index.train(sample)
    add(index, vectors, 0)
    return index


def add(index, vectors: np.ndarray, start: int) -> None:
    """Add rows ``start..`` of ``vectors`` to ``index`` (ids continue from ``index.ntotal`` = ``start``)."""
    if index.ntotal != start:
        raise ValueError(f"the index holds {index.ntotal} vectors, cannot append from row {start}")
    for _, block in chunks(vectors, start):
        index.add(block)


def set_search_param(index, kind: str, value: int | None) -> None:
    import faiss

    if value is None:
        return
    if kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = int(value)
    elif kind == "hnsw":
        index.hnsw.efSearch = int(value)


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top ``k`` by inner product, block by block over a (memory-mapped) array (the reference)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for s, block in chunks(vectors):
        scores = q @ block.T
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(scores, part, axis=1)], axis=1)
        best_i = np.concatenate([best_i, part + s], axis=1)
        top = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, top, axis=1), np.take_along_axis(best_i, top, axis=1)
    return best_i


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` present in the same row of ``found`` (recall@k)."""
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / max(len(t), 1) for f, t in zip(found, truth)]))


def tuning_queries(vectors: np.ndarray, count: int = TUNE_QUERIES, seed: int = 1) -> np.ndarray:
    """Queries near stored vectors: random rows plus noise of norm 0.5, normalized (not the rows themselves)."""
    n, d = vectors.shape
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(count, n), replace=False))
    q = np.asarray(vectors[rows], dtype=np.float32) + rng.standard_normal((len(rows), d)).astype(np.float32) * (
        0.5 / math.sqrt(d))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


@dataclass
class Tuning:
    param: str
    value: int
    recall: float
    tried: dict[int, float] = field(default_factory=dict)


def tune(index, kind: str, vectors: np.ndarray, search, target: float = RECALL_TARGET, k: int = 10) -> Tuning:
    """The smallest nprobe / efSearch whose recall@k against exact search reaches ``target``.

    ``search(queries, k)`` is the backend's search (with its re-ranking), so what is tuned is what is served.
    When no value reaches ``target`` the largest is returned with the recall it gave: the caller says what the miss
    means (``clipforge index`` warns, or replaces an auto-chosen HNSW graph by IVF-Flat and says that instead).
    """
    q = tuning_queries(vectors)
    truth = exact_topk(vectors, q, k)
    if kind in ("ivf", "ivfpq"):
        import faiss

        nlist = faiss.extract_index_ivf(index).nlist
        param, values = "nprobe", [v for v in NPROBES if v < nlist] + [nlist]
    else:
        param, values = "ef_search", list(EF_SEARCHES)
    tried: dict[int, float] = {}
    for v in values:
        set_search_param(index, kind, v)
        r = recall_at(search(q, k)[1], truth)
        tried[v] = round(r, 4)
        if r >= target:
            return Tuning(param, v, r, tried)
    return Tuning(param, values[-1], r, tried)


__all__ = ["KINDS", "AnnSpec", "IndexBudgetError", "choose_index", "estimate_memory", "parse_memory", "build", "add",
           "tune", "exact_topk", "recall_at", "n_lists", "pq_codes", "set_search_param", "ANN_FILE", "RECALL_TARGET"]
