"""Embedding a collection with Ray Data: ``clipforge embed MODEL --images DIR|--dataset SPEC --engine ray``.

The collection (:class:`clipforge.serve.embed.Collection`) becomes a Ray dataset of rows ``index``,
``key``, ``path``, ``offset``, ``size`` (where each image's bytes are; no pixels travel through the
object store). ``Dataset.map_batches`` runs :class:`EmbedActor` in a fixed pool of
``ray.data.ActorPoolStrategy(size=actors)`` actors of ``cpus_per_actor`` CPUs each: an actor loads the
model once, in its constructor, then decodes, preprocesses and encodes batch after batch with the same
:func:`~clipforge.serve.embed.read_pixels` as the single-process engine. The driver collects the
embeddings, in whatever order they finish, into fixed output blocks of ``block_size`` consecutive
items and writes each block as soon as all its items are back; at the end the blocks are read back in
order, so the result has the single-process engine's rows in its order.

Work directory (default: the output path plus ``.blocks``)::

    plan.json               the collection's size and fingerprint, the block size, the model's source
                            and the SHA-256 of its weights (as loaded for this run, dtype cast included)
    block-000000.npz        index (collection positions of the readable images), embedding [n, d]
                            float32, bad (positions of unreadable images)
    block-000000.COMPLETE   written after its .npz is complete

Resume: a block with its ``COMPLETE`` marker is not computed again; a rerun sends only the items of
the other blocks to Ray (an interrupted or failed run loses at most the blocks in flight). A work
directory written for another collection (other files, order, sizes or modification times), another
block size or other weights (the driver loads the model once to hash them, before Ray starts) is
refused before anything is mixed in, with a message saying what differs and to delete it or choose
another ``--work-dir``; each actor's weights are checked against the driver's too. One run at a time holds the directory
(:func:`clipforge.locking.exclusive_lock`).

Where Ray runs: with no ``address``, a Ray instance already initialized in this process, else a new
local one (``ray.init(address="local")``: ``RAY_ADDRESS`` is not consulted), shut down at the end;
``address="auto"`` joins the cluster ``ray start`` made on this machine; with ``address``
(``HOST:PORT`` of a head node, or ``ray://HOST:PORT`` for Ray Client), that cluster, after a TCP
check that something answers there within ``connect_timeout`` seconds (a dead address fails fast
with a message instead of Ray's long retries). On a cluster, every node needs clipforge, the model's
file at the same path, and the images at the paths the driver lists.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ClipforgeError, ConfigError
from ..evaluation.datasets import ImageRef
from ..images import ImageLoadError
from ..locking import exclusive_lock
from .embed import SKIP_BAD_HINT, Collection, EmbedResult, prepare_model, read_pixels

log = logging.getLogger(__name__)

PLAN_FORMAT = 1
INSTALL_HINT = "pip install clipforge[ray]"


def import_ray():
    """The ``ray`` module with Ray Data, or a :class:`ConfigError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data needs pandas and pyarrow beside ray itself)
    except ImportError as e:
        raise ConfigError(f"--engine ray needs Ray Data, which cannot be imported ({e}); install it with "
                          f"`{INSTALL_HINT}`, or leave out --engine ray to embed in this process") from None
    return ray


@dataclass
class ModelLoader:
    """What each actor calls once to get ``(model, image transform)``: ``clipforge.load(source, **options)``,
    in eval mode, cast by :func:`~clipforge.serve.embed.prepare_model` for ``dtype``. Picklable, so Ray ships it."""

    source: str
    options: dict[str, Any] = field(default_factory=dict)
    dtype: str = "fp32"

    def __call__(self):
        from ..interop import load

        model, _tokenizer, transform = load(self.source, **self.options)
        return prepare_model(model.eval(), self.dtype, self.source), transform


class EmbedActor:
    """A Ray Data actor: holds the model from its constructor on and encodes batches of collection rows."""

    def __init__(self, loader: Callable, threads: int = 1):
        import torch

        from .index import weights_sha256

        torch.set_num_threads(max(1, int(threads)))
        self.model, self.transform = loader()
        self.weights = weights_sha256(self.model)
        self.dim = int(self.model.cfg.embed_dim)
        self.ready = time.time()  # wall clock (comparable across processes): when this actor could start work

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["index"])
        ok = np.zeros(n, dtype=bool)
        errors = [""] * n
        pixels = []
        for j in range(n):
            ref = ImageRef(str(batch["path"][j]), int(batch["offset"][j]), int(batch["size"][j]))
            try:
                pixels.append(read_pixels(ref, str(batch["key"][j]), self.transform))
                ok[j] = True
            except ImageLoadError as e:
                errors[j] = str(e)
        emb = np.zeros((n, self.dim), dtype=np.float32)
        if pixels:
            with torch.no_grad():
                emb[ok] = self.model.encode_image(torch.stack(pixels)).float().numpy()
        return {"index": np.asarray(batch["index"], dtype=np.int64), "ok": ok, "error": np.array(errors, dtype=object),
                "embedding": emb, "weights": np.array([self.weights] * n, dtype=object),
                "ready": np.full(n, self.ready)}


def probe_address(address: str, timeout: float) -> None:
    """Check that something accepts TCP connections at ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``)
    within ``timeout`` seconds; ``auto`` is left to Ray. A :class:`ClipforgeError` naming the address otherwise."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: expected HOST:PORT (the head node's address, e.g. "
                          "10.0.0.5:6379), ray://HOST:PORT (Ray Client, port 10001 by default) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ClipforgeError(
            f"no Ray cluster answers at {address} ({why}, waited up to {timeout:g} s); start one there "
            f"(`ray start --head --port {port}` on {host}), check the host and port, or leave out --ray-address to "
            "run on a local Ray instance") from None


def connect(ray, address: str | None) -> bool:
    """Make sure this process is connected to Ray; True when this call started the connection (then the caller
    shuts it down). ``address`` None: a Ray already initialized here, else a new local instance; an address
    is checked with :func:`probe_address` first."""
    if ray.is_initialized():
        if address is not None:
            raise ConfigError(f"Ray is already initialized in this process, so it cannot connect to {address}; "
                              "call ray.shutdown() first, or leave out the address to use that Ray")
        return False
    try:
        # "local": a new instance even when RAY_ADDRESS or a `ray start` cluster on this machine would be found
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    except (ConnectionError, TimeoutError) as e:
        raise ClipforgeError(f"cannot connect to the Ray cluster at {address or 'a local instance'}: {e}; check that "
                             "the cluster is up (`ray status` on its head node) and reachable from here") from None
    return True


def user_cause(error: BaseException) -> BaseException | None:
    """The clipforge or input error (``ClipforgeError``, ``ValueError``, ``FileNotFoundError``) under Ray's
    wrappers of an exception raised in an actor, so the command line can show its one-line message."""
    seen: set[int] = set()
    queue: list[BaseException | None] = [error]
    while queue:
        x = queue.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        inner = getattr(x, "cause", None)
        wrapper = type(x).__module__.split(".")[0] == "ray" or inner is not None
        if not wrapper and isinstance(x, (ClipforgeError, ValueError, FileNotFoundError)):
            return x
        queue += [inner if isinstance(inner, BaseException) else None, x.__cause__, x.__context__]
    return None


class BlockStore:
    """The work directory's plan and output blocks (see the module docstring)."""

    def __init__(self, work_dir: str | Path, collection: Collection, block_size: int, source: str):
        self.dir = Path(work_dir)
        self.n = len(collection)
        self.block_size = block_size
        self.blocks = math.ceil(self.n / block_size)
        self.plan = {"format": PLAN_FORMAT, "count": self.n, "block_size": block_size,
                     "collection_sha256": collection.fingerprint(), "model": source, "weights_sha256": None}

    def open(self) -> None:
        """Create the directory and its plan, or check that the plan there is this run's."""
        path = self.dir / "plan.json"
        if path.exists():
            old = json.loads(path.read_text())
            fix = f"delete {self.dir} (its blocks belong to another run) or give another --work-dir"
            if old.get("format") != PLAN_FORMAT:
                raise ConfigError(f"{path} is not a plan this version writes (format {old.get('format')}); {fix}")
            if old.get("block_size") != self.block_size:
                raise ConfigError(f"{self.dir} holds blocks of {old.get('block_size')} items, not --block-size "
                                  f"{self.block_size}; rerun with --block-size {old.get('block_size')}, or {fix}")
            if old.get("count") != self.n or old.get("collection_sha256") != self.plan["collection_sha256"]:
                raise ConfigError(f"{self.dir} holds blocks of another collection ({old.get('count')} images then, "
                                  f"{self.n} now, or changed files or order); {fix}")
            self.plan["weights_sha256"] = old.get("weights_sha256")
            self.plan["model"] = old.get("model", self.plan["model"])
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._write_plan()

    def _write_plan(self) -> None:
        tmp = self.dir / "plan.json.tmp"
        tmp.write_text(json.dumps(self.plan, indent=1))
        os.replace(tmp, self.dir / "plan.json")

    def check_weights(self, sha: str) -> None:
        """Record the weights of this run's model, or refuse weights other than the ones the finished blocks used."""
        if self.plan["weights_sha256"] is None:
            self.plan["weights_sha256"] = sha
            self._write_plan()
        elif self.plan["weights_sha256"] != sha:
            raise ConfigError(f"{self.dir} holds blocks embedded by other weights (of {self.plan['model']}); "
                              f"embeddings of different weights do not mix: delete {self.dir} or give another "
                              "--work-dir")

    def check_actor_weights(self, sha: str) -> None:
        """Refuse an actor whose model is not the one this driver loaded (another file at the path on its node)."""
        if sha != self.plan["weights_sha256"]:
            raise ClipforgeError(f"a Ray actor loaded other weights for {self.plan['model']} than this process did "
                                 "(the model file differs between nodes); give every node the same file")

    def span(self, b: int) -> range:
        return range(b * self.block_size, min((b + 1) * self.block_size, self.n))

    def _npz(self, b: int) -> Path:
        return self.dir / f"block-{b:06d}.npz"

    def _marker(self, b: int) -> Path:
        return self.dir / f"block-{b:06d}.COMPLETE"

    def complete(self) -> list[int]:
        return [b for b in range(self.blocks) if self._marker(b).exists() and self._npz(b).exists()]

    def write(self, b: int, index: np.ndarray, embedding: np.ndarray, bad: np.ndarray) -> None:
        tmp = self.dir / f"block-{b:06d}.tmp.npz"
        np.savez(tmp, index=index.astype(np.int64), embedding=embedding.astype(np.float32), bad=bad.astype(np.int64))
        os.replace(tmp, self._npz(b))
        self._marker(b).write_text(f"{len(index)} embedded, {len(bad)} unreadable\n")

    def read(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with np.load(self._npz(b)) as z:
            return z["index"], z["embedding"], z["bad"]


class _Pending:
    """The rows of one block received so far."""

    def __init__(self):
        self.index: list[np.ndarray] = []
        self.embedding: list[np.ndarray] = []
        self.bad: list[np.ndarray] = []
        self.count = 0


def embed_ray(loader: Callable, collection: Collection, work_dir: str | Path, *, source: str = "",
              block_size: int = 1024, batch_size: int = 64, actors: int = 2, cpus_per_actor: int = 1,
              skip_bad: bool = False, address: str | None = None, connect_timeout: float = 5.0,
              progress: bool = True) -> EmbedResult:
    """Embed ``collection`` with a Ray Data actor pool (see the module docstring); the rows and order of
    :func:`clipforge.serve.embed.embed_local`. ``loader()`` returns ``(model, image transform)`` in each actor
    (:class:`ModelLoader` for ``clipforge.load``); ``source`` names the model in the plan and in messages."""
    for name, value in (("--block-size", block_size), ("--batch-size", batch_size), ("--ray-actors", actors),
                        ("--ray-cpus-per-actor", cpus_per_actor)):
        if int(value) < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if connect_timeout <= 0:
        raise ConfigError(f"the Ray connect timeout must be positive, got {connect_timeout}")
    ray = import_ray()
    if address is not None:
        probe_address(address, connect_timeout)  # a dead address fails before anything is written
    store = BlockStore(work_dir, collection, block_size, source)
    store.dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(store.dir, what="embedding work directory"):
        store.open()
        # the weights this run embeds with, loaded once here: blocks of other weights are refused before Ray starts
        from .index import weights_sha256

        model, _transform = loader()
        store.check_weights(weights_sha256(model))
        dim = int(model.cfg.embed_dim)
        del model, _transform
        done = set(store.complete())
        todo = [b for b in range(store.blocks) if b not in done]
        if done:
            log.info("%s: %d of %d blocks are complete from an earlier run; embedding the other %d",
                     store.dir, len(done), store.blocks, len(todo))
        timings: dict[str, float] = {}
        if todo:
            started = connect(ray, address)
            try:
                timings = _run(ray, loader, collection, store, todo, batch_size=batch_size, actors=actors,
                               cpus_per_actor=cpus_per_actor, skip_bad=skip_bad, progress=progress)
            finally:
                if started:
                    ray.shutdown()
        res = _assemble(collection, store, dim, computed=len(todo), reused=len(done))
        res.timings = timings
        return res


def _run(ray, loader, collection: Collection, store: BlockStore, todo: list[int], *, batch_size: int, actors: int,
         cpus_per_actor: int, skip_bad: bool, progress: bool) -> dict[str, float]:
    import pyarrow as pa

    have = ray.cluster_resources().get("CPU", 0)
    if have < actors * cpus_per_actor:
        raise ConfigError(f"the Ray cluster has {have:g} CPUs, and {actors} actors of {cpus_per_actor} CPUs need "
                          f"{actors * cpus_per_actor}; lower --ray-actors or --ray-cpus-per-actor")
    index = np.concatenate([np.arange(s.start, s.stop) for s in map(store.span, todo)])
    tables = []
    for i in range(0, len(index), batch_size):  # one Ray block per batch: work spreads evenly over the actors
        part = index[i : i + batch_size]
        refs = [collection.refs[j] for j in part]
        tables.append(pa.table({"index": pa.array(part, pa.int64()),
                                "key": [collection.keys[j] for j in part], "path": [r.path for r in refs],
                                "offset": pa.array([r.offset for r in refs], pa.int64()),
                                "size": pa.array([r.size for r in refs], pa.int64())}))
    ray.data.DataContext.get_current().enable_progress_bars = progress
    if not progress:  # --quiet: no Ray Data progress bars, nor its INFO lines about starting and finishing
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ds = ray.data.from_arrow(tables).map_batches(
        EmbedActor, batch_size=batch_size, batch_format="numpy", num_cpus=cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"loader": loader, "threads": cpus_per_actor})
    pending: dict[int, _Pending] = {}
    start, ready, rows = time.time(), math.inf, 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows += len(batch["index"])
            if len(batch["index"]):
                ready = min(ready, float(batch["ready"].min()))
                store.check_actor_weights(str(batch["weights"][0]))
            for b, sel in _by_block(batch["index"], store.block_size):
                ok = batch["ok"][sel]
                if not skip_bad and not ok.all():
                    raise ValueError(f"{batch['error'][sel][~ok][0]} ({SKIP_BAD_HINT})")
                acc = pending.setdefault(b, _Pending())
                acc.index.append(batch["index"][sel][ok])
                acc.embedding.append(batch["embedding"][sel][ok])
                acc.bad.append(batch["index"][sel][~ok])
                acc.count += int(sel.sum())
                if acc.count == len(store.span(b)):
                    idx, emb, bad = (np.concatenate(acc.index), np.concatenate(acc.embedding), np.concatenate(acc.bad))
                    order = np.argsort(idx)
                    store.write(b, idx[order], emb[order], np.sort(bad))
                    del pending[b]
    except Exception as e:
        cause = user_cause(e)
        if cause is None or cause is e:
            raise
        raise cause from None
    if pending:  # every row comes back exactly once; anything else is a bug worth a traceback
        raise RuntimeError(f"Ray returned blocks {sorted(pending)} incomplete")
    end = time.time()
    ready = min(ready, end)
    return {"startup": max(0.0, ready - start), "streaming": end - ready, "images": float(rows)}


def _by_block(index: np.ndarray, block_size: int):
    blocks = index // block_size
    for b in np.unique(blocks):
        yield int(b), blocks == b


def _assemble(collection: Collection, store: BlockStore, dim: int, computed: int, reused: int) -> EmbedResult:
    keys, chunks, bad = [], [], []
    for b in range(store.blocks):
        index, emb, bad_index = store.read(b)
        keys.extend(collection.keys[i] for i in index)
        chunks.append(emb)
        bad.extend(collection.keys[i] for i in bad_index)
    emb = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    return EmbedResult(keys, emb, bad, blocks_computed=computed, blocks_reused=reused)


__all__ = ["INSTALL_HINT", "BlockStore", "EmbedActor", "ModelLoader", "connect", "embed_ray", "import_ray",
           "probe_address", "user_cause"]
