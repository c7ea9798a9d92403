"""The build pipeline shared by the corpora: prepare in a process pool, split without leakage, write shards.

A corpus module supplies candidates ``(key, payload)`` and a picklable ``prepare(payload, image_size)``
that returns ``{"captions", "labels", "png", "extra"}`` or the reason (a string) to skip it.
:func:`build_corpus` then

1. prepares every candidate in a pool (with a tqdm bar), computing each image's 128-bit
   horizontal + vertical dHash;
2. splits by a hash of the key, moves near-duplicate groups that touch train into train, and
   reports captions shared across splits (:mod:`clipforge.data.splits`);
3. saves that plan as ``plan.json`` (so a rerun after an interruption skips steps 1-2), and
4. writes the shards split by split with :class:`clipforge.data.shards.ShardSetWriter`, which
   resumes after the last complete shard, and finally ``stats.json`` and ``manifest.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from ..phash import dhash_hv
from ..shards import MANIFEST, SPLITS, ShardSample, ShardSetWriter
from ..splits import caption_overlap, control_leakage, hash_split

logger = logging.getLogger(__name__)

PLAN = "plan.json"
BUILD_VERSION = 2


class MissingSourceError(FileNotFoundError):
    """The Debian package (or other source) a corpus is built from is not installed."""


def require(path: str | os.PathLike, package: str) -> Path:
    """``path`` if it exists, else a :class:`MissingSourceError` naming the Debian package to install."""
    p = Path(path)
    if not p.exists():
        raise MissingSourceError(f"{p} not found: it comes with the Debian package '{package}'; "
                                 f"install it with `apt-get update && apt-get install -y {package}`")
    return p


def _prepare_and_hash(prepare: Callable, item: tuple[str, Any]) -> tuple[str, Any]:
    key, payload = item
    try:
        result = prepare(payload)
    except Exception as e:  # a corpus file we cannot process is skipped and counted, never fatal
        return key, f"error:{type(e).__name__}"
    if isinstance(result, dict):
        result["hash"] = list(dhash_hv(result["png"]))
    return key, result


def parallel_map(fn: Callable, items: Sequence, workers: int = 2, desc: str = "", progress: bool = True) -> Iterator:
    """``fn`` over ``items`` in order, in a pool of ``workers`` processes (inline when 1), with a tqdm bar."""
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, mininterval=1.0)
    try:
        if workers <= 1 or len(items) < 2 * workers:
            for x in items:
                yield fn(x)
                bar.update(1)
        else:
            with get_context("fork").Pool(workers) as pool:
                for r in pool.imap(fn, items, chunksize=8):
                    yield r
                    bar.update(1)
    finally:
        bar.close()


def fingerprint(name: str, keys: Sequence[str], image_size: int, limit: int | None) -> str:
    h = hashlib.sha1(json.dumps([name, BUILD_VERSION, image_size, limit, list(keys)]).encode())
    return h.hexdigest()[:16]


def select(candidates: Sequence[tuple[str, Any]], limit: int | None) -> list[tuple[str, Any]]:
    """All candidates sorted by key, or ``limit`` of them spread over the corpus (lowest key hashes)."""
    ordered = sorted(candidates, key=lambda c: c[0])
    if limit is None or limit >= len(ordered):
        return ordered
    pick = sorted(ordered, key=lambda c: hashlib.sha1(c[0].encode()).digest())[:limit]
    return sorted(pick, key=lambda c: c[0])


def build_corpus(name: str, out: str | os.PathLike, candidates: Sequence[tuple[str, Any]],
                 prepare: Callable[..., dict | str], label_views: dict[str, dict[str, Any]], image_size: int = 128,
                 limit: int | None = None, workers: int = 2, shard_bytes: int = 16 << 20, progress: bool = True,
                 pre_skipped: Counter | None = None, info: dict[str, Any] | None = None,
                 leakage_distance: int = 8) -> dict[str, Any]:
    """Build corpus ``name`` into ``out`` (see the module docstring); returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = select(candidates, limit)
    payloads = dict(chosen)
    fp = fingerprint(name, [k for k, _ in chosen], image_size, limit)
    if (out / MANIFEST).exists():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("fingerprint") == fp:
            logger.info("%s: already built at %s (%d samples); nothing to do", name, out, manifest["total"])
            return manifest
        raise ValueError(f"{out} holds a different build of '{manifest.get('name')}' "
                              f"(other sources, --image-size or --limit); remove it or choose another --out")
    prep = partial(prepare, image_size=image_size)
    t0 = time.perf_counter()
    cache: dict[str, dict] = {}
    plan_path = out / PLAN
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else None
    if plan is not None and plan.get("fingerprint") != fp:
        raise ValueError(f"{out} holds an unfinished build with other settings; remove it or choose another --out")
    if plan is None:
        skipped: Counter = Counter(pre_skipped or {})
        records: dict[str, dict] = {}
        for key, r in parallel_map(partial(_prepare_and_hash, prep), chosen, workers, f"{name}: render", progress):
            if isinstance(r, str):
                skipped[r] += 1
                continue
            cache[key] = r
            records[key] = {"captions": r["captions"], "labels": r["labels"], "extra": r.get("extra", {}),
                            "hash": r["hash"]}
        keys = sorted(records)
        first = [hash_split(k) for k in keys]
        final, leakage = control_leakage(keys, first, [records[k]["hash"] for k in keys], leakage_distance)
        for k, s in zip(keys, final):
            records[k]["split"] = s
        overlap = caption_overlap([records[k]["captions"] for k in keys], final)
        plan = {"fingerprint": fp, "records": records, "skipped": dict(skipped), "leakage": leakage,
                "caption_overlap": overlap, "prepare_seconds": round(time.perf_counter() - t0, 1)}
        plan_path.write_text(json.dumps(plan, ensure_ascii=False))
    else:
        logger.info("%s: resuming the build in %s", name, out)
    records = plan["records"]

    def produce(keys: Sequence[str]) -> Iterable[ShardSample | str]:
        missing = [(k, payloads[k]) for k in keys if k not in cache]
        fresh = dict(parallel_map(partial(_prepare_and_hash, prep), missing, workers, f"{name}: render", progress)) \
            if missing else {}
        for k in keys:
            r = cache.pop(k, None) or fresh.pop(k)
            if isinstance(r, str):
                yield f"{r}_on_resume"
                continue
            rec = records[k]
            yield ShardSample(k, r["png"], rec["captions"], rec["labels"], "png", rec["extra"])

    writer = ShardSetWriter(out, shard_bytes)
    written = {}
    for split in SPLITS:
        keys = sorted(k for k, rec in records.items() if rec["split"] == split)
        written[split] = writer.write_split(split, keys, produce)
    build_info = {"fingerprint": fp, "image_size": image_size, "limit": limit, "candidates": len(candidates),
                  "selected": len(chosen), **(info or {})}
    extra = {"leakage": plan["leakage"], "caption_overlap": plan["caption_overlap"],
             "build": {"prepare_seconds": plan["prepare_seconds"], "total_seconds": round(time.perf_counter() - t0, 1),
                       "workers": workers, "shards": written}}
    manifest = writer.finish(name, label_views, skipped=Counter(plan["skipped"]), info=build_info, extra_stats=extra)
    plan_path.unlink()
    return manifest


def clean(out: str | os.PathLike) -> None:
    """Remove a build directory (used by tests and ``--force``)."""
    shutil.rmtree(out, ignore_errors=True)
