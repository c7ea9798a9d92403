"""Stream webdataset shards for training at scale: workers x ranks, a shuffle buffer, epochs or
resampling, an exact resumable position and exact accounting of skipped samples.

    ds = StreamingShards("~/.cache/clipforge/data/openclipart", split="train", image_size=64,
                         shuffle_buffer=1000, seed=0, epochs=None, rank=0, world_size=1)
    loader = StreamingLoader(ds, batch_size=64, num_workers=2, tokenizer=tok)
    for batch in loader:          # {"images", "texts", "captions", "keys", "skipped", "skipped_by_reason", ...}
        ...
        state = loader.state_dict()   # small: epoch and, per worker, (epoch, records consumed)
    StreamingLoader(ds, 64, num_workers=2, state=state)   # continues with exactly the next batch

How the stream is laid out
- **Shards to workers.** Worker ``w`` of rank ``r`` is global worker ``g = r * num_workers + w`` of
  ``G = world_size * num_workers``. In epoch ``e`` the shard list is permuted with the seed
  ``(seed, e)`` and worker ``g`` reads shards ``g, g + G, g + 2G, ...`` of that order, so every
  shard is read exactly once per epoch over all workers of all ranks. With ``resampled=True``
  each global worker instead draws shards with replacement forever from the seed ``(seed, e, g)``
  (for web-scale runs measured in steps, and for ranks that must never run dry).
- **Records.** A record is the tar members sharing a key (``KEY.png`` + ``KEY.json``, as webdataset
  groups them). A shard that is truncated or unreadable ends with one ``bad_shard`` record.
- **Shuffle buffer.** Each worker shuffles its records with a buffer of ``shuffle_buffer`` records
  (seed ``(seed, e, g)``), emptied at the end of each epoch so an epoch is a permutation of its
  records. The buffer holds only member offsets, not bytes, so a large buffer costs no memory.
- **Decode in the worker.** The json is parsed, captions and labels are checked, the image is
  decoded and passed through :func:`clipforge.transforms.image_transform` (with ``augment`` the
  training transform, its random draws seeded by ``(seed, e, g, position)``), one caption is
  chosen. A record that cannot be used becomes ``{"error": reason}`` with a reason of
  :data:`clipforge.data.formats.SKIP_REASONS` (``corrupt_image``, ``missing_image``,
  ``no_caption``, ``bad_row``, ``bad_shard``); it is never raised.
- **Position.** Every item carries ``(w, e, n)``: its worker, epoch and how many records of that
  epoch's worker sequence have been consumed including it. Batches come from one worker each,
  in DataLoader's round-robin order, so the main process knows after each batch how far every
  worker is and which worker delivers the next batch. :meth:`StreamingLoader.state_dict` is that
  position. Resuming, worker ``w`` replays its shard sequence and shuffle buffer over member
  offsets only (tar headers are read, image bytes are not, nothing is decoded) and skips the
  ``n`` records it had consumed, and the DataLoader's workers are rotated so the worker that was
  next delivers first: the resumed run yields exactly the batches the uninterrupted run would have.
- **Accounting.** Every record that leaves a shuffle buffer is in exactly one batch, as a sample or
  as an error; each batch states ``skipped`` and ``skipped_by_reason``, and
  :class:`StreamStats` (``loader.stats``) sums them in the main process over all workers (it is
  saved with the position, so the totals of a resumed run are those of the whole run).

Why ``tarfile`` and not the ``webdataset`` package (which :func:`clipforge.data.formats.iter_webdataset`
uses): an exact resume needs the record stream to be replayed cheaply, and the shuffle buffer
to hold references rather than bytes; ``tarfile`` over a seekable file gives each member's
offset and size from its header alone. webdataset's pipeline reads every byte to skip, keeps
its shuffle buffer in samples and takes its worker/rank splitting and shuffle seeds from its own
state; its error handler also reports one damaged tar at two stages. The cost of this choice:
shards must be local (or mounted) files, not ``pipe:``/``http`` URLs.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tarfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..images import ImageLoadError, load_image
from ..transforms import image_transform
from .formats import SKIP_REASONS, clean_captions, decode_labels
from .shards import MANIFEST, read_manifest

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
STATE_VERSION = 1
_SHUFFLE, _RESAMPLE, _ITEM = 1, 2, 3  # seed tags: the streams of random numbers do not overlap


def shard_files(source: str | os.PathLike | Sequence[str | os.PathLike], split: str = "train") -> list[str]:
    """The ``.tar`` shards of ``source``: a shard directory (its manifest's ``split``, else
    ``{split}-*.tar``, else every ``*.tar``), one ``.tar``, or a list of them."""
    if not isinstance(source, (str, os.PathLike)):
        files = [str(Path(s).expanduser()) for s in source]
    else:
        p = Path(source).expanduser()
        if p.is_file():
            files = [str(p)]
        elif (p / MANIFEST).exists():
            manifest = read_manifest(p)
            if split not in manifest["splits"]:
                raise KeyError(f"split '{split}' not in {p}; available: {sorted(manifest['splits'])}")
            files = [str(p / s["file"]) for s in manifest["splits"][split]["shards"]]
        elif p.is_dir():
            files = [str(f) for f in (sorted(p.glob(f"{split}-*.tar")) or sorted(p.glob("*.tar")))]
        else:
            raise FileNotFoundError(f"{source}: no such shard directory or .tar file")
    if not files:
        raise FileNotFoundError(f"{source}: no .tar shards found")
    return files


def tar_records(path: str) -> Iterator[dict[str, Any]]:
    """The records of one shard: ``{"key", "shard", "members": {ext: (offset, size)}}``, from the tar
    headers only. A shard that is truncated or unreadable ends with ``{"error": "bad_shard"}``
    (the records before the damage are kept; the one being read at the damage is dropped)."""
    current: dict[str, Any] | None = None
    try:
        end = os.path.getsize(path)
        with tarfile.open(path, "r:") as tar:  # seekable mode: iterating reads headers and seeks over data
            for m in tar:
                if not m.isfile():
                    continue
                folder, base = os.path.split(m.name)
                stem, _, ext = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                if current is None or current["key"] != key:
                    if current is not None:
                        yield current
                    current = {"key": key, "shard": path, "members": {}}
                if m.offset_data + m.size > end:
                    raise tarfile.ReadError(f"member '{m.name}' runs past the end of the file (truncated shard)")
                current["members"][ext.lower()] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        yield {"key": Path(path).name, "shard": path, "error": "bad_shard", "detail": f"{type(e).__name__}: {e}"}
        return
    if current is not None:
        yield current


def shuffled(records: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer: fill ``size`` records, then emit a random one and put the next record in
    its place; at the end, drain the buffer in random order. ``size <= 1`` keeps the order."""
    if size <= 1:
        yield from records
        return
    buf: list[Any] = []
    for r in records:
        if len(buf) < size:
            buf.append(r)
            continue
        j = int(rng.integers(size))
        out, buf[j] = buf[j], r
        yield out
    while buf:
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


class _OpenFiles:
    """A few open shard files (the buffer may refer to shards read a while ago)."""

    def __init__(self, limit: int = 16):
        self.limit, self.handles = limit, OrderedDict()

    def read(self, path: str, ref: tuple[int, int]) -> bytes:
        f = self.handles.get(path)
        if f is None:
            f = self.handles[path] = open(path, "rb")
            if len(self.handles) > self.limit:
                self.handles.popitem(last=False)[1].close()
        self.handles.move_to_end(path)
        offset, size = ref
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"short read in {path} at {offset}")
        return data

    def close(self) -> None:
        for f in self.handles.values():
            f.close()
        self.handles.clear()


def initial_state(
    num_workers: int, fingerprint: str, rank: int = 0, world_size: int = 1, epoch: int = 0
) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "fingerprint": fingerprint,
        "rank": rank,
        "world_size": world_size,
        "num_workers": num_workers,
        "epoch": epoch,
        "next_worker": 0,
        "workers": [[epoch, 0] for _ in range(num_workers)],
        "stats": StreamStats().as_dict(),
    }


class StreamingShards(IterableDataset):
    """Items ``{"pixels", "caption", "captions", "key", "labels", "_pos"}`` or ``{"error", "detail", "key", "_pos"}``
    streamed from webdataset shards (see the module docstring for the layout of the stream).

    ``epochs``: how many epochs to stream (``None``: forever); ``resampled``: draw shards with
    replacement forever instead; ``shuffle_buffer``: records per worker buffer (0 or 1: shard order,
    and shards in stored order too); ``augment``: the training transform instead of resize + center crop;
    ``caption_policy``: ``random`` (one caption per sample, seeded) or ``first``.
    """

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike], split: str = "train",
                 image_size: int = 64, augment: bool = False, shuffle_buffer: int = 1000, seed: int = 0,
                 epochs: int | None = 1, resampled: bool = False, rank: int = 0, world_size: int = 1,
                 caption_policy: str = "random"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if caption_policy not in ("random", "first"):
            raise ValueError(f"caption_policy must be random or first, got '{caption_policy}'")
        self.shards = shard_files(source, split)
        self.image_size, self.augment, self.shuffle_buffer, self.seed = image_size, augment, shuffle_buffer, seed
        self.epochs, self.resampled, self.rank, self.world_size = epochs, resampled, rank, world_size
        self.caption_policy = caption_policy
        self.state: dict[str, Any] | None = None  # the position to start from; set by StreamingLoader

    @property
    def fingerprint(self) -> str:
        """What a saved position depends on: the shards, seed, buffer size and mode."""
        spec = [[Path(s).name for s in self.shards], self.seed, self.shuffle_buffer, self.resampled]
        return hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:16]

    def check_state(self, state: dict[str, Any], num_workers: int) -> dict[str, Any]:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown streaming position version {state.get('version')}")
        saved = {k: state[k] for k in ("num_workers", "rank", "world_size")}
        now = {"num_workers": num_workers, "rank": self.rank, "world_size": self.world_size}
        if saved != now:
            raise ValueError(f"the saved stream position was taken with {saved}, this loader has {now}; "
                             "resume with the same number of workers and ranks (data.num_workers)")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("the saved stream position belongs to other shards, seed, shuffle buffer or mode; "
                             "it cannot be continued exactly")
        return state

    # ------------------------------------------------------------ the stream of one worker

    def _epoch_shards(self, epoch: int, g: int, total: int) -> list[str]:
        n = len(self.shards)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle_buffer > 1 else np.arange(n)
        return [self.shards[i] for i in order[g::total]]

    def _resampled_shards(self, epoch: int, g: int) -> Iterator[str]:
        rng = np.random.default_rng([self.seed, epoch, g, _RESAMPLE])
        while True:
            yield self.shards[int(rng.integers(len(self.shards)))]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_workers, physical = (info.num_workers, info.id) if info is not None else (1, 0)
        state = self.check_state(self.state, num_workers) if self.state is not None else \
            initial_state(num_workers, self.fingerprint, self.rank, self.world_size)
        w = (state["next_worker"] + physical) % num_workers  # rotated so the worker that was next delivers first
        g, total = self.rank * num_workers + w, self.world_size * num_workers
        epoch, skip = state["workers"][w]
        if total > len(self.shards) and not self.resampled and self.epochs is None:
            raise ValueError(f"{len(self.shards)} shards cannot feed {total} workers (world_size x num_workers) "
                             "forever; use fewer workers, more shards or resampled=True")
        transform = image_transform(self.image_size, is_train=self.augment)
        files = _OpenFiles()
        try:
            while self.epochs is None or epoch < self.epochs:
                shards = self._resampled_shards(epoch, g) if self.resampled else self._epoch_shards(epoch, g, total)
                records = chain.from_iterable(tar_records(s) for s in shards)
                n = 0
                for rec in shuffled(
                    records, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, g, _SHUFFLE])
                ):
                    n += 1
                    if n > skip:
                        yield self._decode(rec, files, transform, g, (w, epoch, n))
                if n == 0 and self.epochs is None:  # endless epochs over empty shards would spin forever
                    raise RuntimeError(f"worker {g}: its shards of epoch {epoch} hold no records")
                epoch, skip = epoch + 1, 0
        finally:
            files.close()

    def _decode(self, rec: dict[str, Any], files: _OpenFiles, transform: Callable, g: int,
                pos: tuple[int, int, int]) -> dict[str, Any]:
        key = rec["key"]

        def bad(reason: str, detail: str) -> dict[str, Any]:
            return {"error": reason, "detail": f"{key}: {detail}", "key": key, "_pos": pos}

        if "error" in rec:
            return bad(rec["error"], rec["detail"])
        members = rec["members"]
        if "json" in members:
            try:
                meta = json.loads(files.read(rec["shard"], members["json"]))
            except (ValueError, OSError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                meta = None
            if not isinstance(meta, dict):
                return bad("bad_row", "broken json")
        elif "txt" in members:  # the plain webdataset convention: KEY.txt holds the caption
            try:
                meta = {"captions": [files.read(rec["shard"], members["txt"]).decode("utf-8")]}
            except (UnicodeDecodeError, OSError):
                return bad("bad_row", "caption .txt is not UTF-8")
        else:
            return bad("bad_row", "no json or txt member")
        captions = clean_captions(meta.get("captions", meta.get("caption")))
        if captions is None:
            return bad("bad_row", "captions are not strings")
        if not captions:
            return bad("no_caption", "no non-empty caption")
        labels = decode_labels(meta)
        if labels is None:
            return bad("bad_row", "labels are not integers")
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            return bad("missing_image", "no png/jpg/webp member")
        rng = np.random.default_rng([self.seed, pos[1], g, pos[2], _ITEM])
        try:
            image = load_image(files.read(rec["shard"], members[ext]))
            if self.augment:
                pixels = transform(image, generator=torch.Generator().manual_seed(int(rng.integers(2**62))))
            else:
                pixels = transform(image)
        except (ImageLoadError, OSError) as e:
            return bad("corrupt_image", str(e))
        which = 0 if self.caption_policy == "first" else int(rng.integers(len(captions)))
        return {"pixels": pixels, "caption": captions[which], "captions": captions, "key": key, "labels": labels,
                "_pos": pos}


# ---------------------------------------------------------------- main process: batches, position, totals


@dataclass
class StreamStats:
    """Totals over all workers, summed in the main process from the batches it receives."""

    samples: int = 0  # samples delivered in batches
    skipped: Counter = field(default_factory=Counter)  # records skipped, by reason
    batches: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def update(self, batch: dict[str, Any]) -> None:
        self.batches += 1
        self.samples += batch["samples"]
        self.skipped.update(batch["skipped_by_reason"])
        for reason, detail in batch["errors"]:
            ex = self.examples.setdefault(reason, [])
            if len(ex) < self.max_examples:
                ex.append(detail)

    @property
    def records(self) -> int:
        return self.samples + sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "records": self.records,
            "batches": self.batches,
            "skipped": dict(sorted(self.skipped.items())),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamStats:
        return cls(samples=int(d["samples"]), skipped=Counter(d["skipped"]), batches=int(d["batches"]),
                   examples={k: list(v) for k, v in d.get("examples", {}).items()})

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items())) or "none"
        share = f" ({skipped / self.records:.1%})" if self.records else ""
        return f"stream: {self.samples} samples in {self.batches} batches; skipped {skipped}{share}: {reasons}"


def stream_collate(tokenizer: Callable[[list[str]], torch.Tensor] | None = None) -> Callable:
    """Stack the samples of a batch (all from one worker), count its errors, and keep its position."""

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        good = [it for it in items if "error" not in it]
        errors = [(it["error"], it["detail"]) for it in items if "error" in it]
        captions = [it["caption"] for it in good]
        if good:
            pixels = torch.stack([it["pixels"] for it in good])
        return {
            "images": pixels if good else None,
            "texts": tokenizer(captions) if good and tokenizer is not None else None,
            "captions": captions,
            "keys": [it["key"] for it in good],
            "labels": [it["labels"] for it in good],
            "positions": [it["_pos"] for it in good],  # (worker, epoch, records consumed) of each sample
            "samples": len(good),
            "skipped": len(errors),
            "skipped_by_reason": dict(Counter(r for r, _ in errors)),
            "errors": errors,
            "position": items[-1]["_pos"],
        }

    return collate


class StreamingLoader:
    """A DataLoader over :class:`StreamingShards` that tracks the stream position and totals.

    Iterating yields collated batches (see :func:`stream_collate`); :meth:`state_dict` after any
    batch is the position to resume from (``state=`` here, or :meth:`load_state_dict`), and
    :attr:`stats` the totals so far. The number of workers must be the same on resume.
    """

    def __init__(self, dataset: StreamingShards, batch_size: int, num_workers: int = 0,
                 tokenizer: Callable | None = None, state: dict[str, Any] | None = None, prefetch_factor: int = 2):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.tokenizer, self.prefetch_factor = tokenizer, prefetch_factor
        self._state = initial_state(max(1, num_workers), dataset.fingerprint, dataset.rank, dataset.world_size)
        self.stats = StreamStats()
        if state is not None:
            self.load_state_dict(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = copy.deepcopy(self.dataset.check_state(state, max(1, self.num_workers)))
        self.stats = StreamStats.from_dict(self._state["stats"])

    def state_dict(self) -> dict[str, Any]:
        state = copy.deepcopy(self._state)
        state["epoch"] = min(e for e, _ in state["workers"])
        state["stats"] = self.stats.as_dict()
        return state

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = copy.copy(self.dataset)
        ds.state = self.state_dict()
        loader = DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=stream_collate(self.tokenizer), persistent_workers=False,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None)
        n = max(1, self.num_workers)
        for batch in loader:
            w, epoch, consumed = batch["position"]
            self._state["workers"][w] = [epoch, consumed]
            self._state["next_worker"] = (w + 1) % n
            self.stats.update(batch)
            yield batch


__all__ = ["StreamingShards", "StreamingLoader", "StreamStats", "stream_collate", "shard_files", "tar_records",
           "shuffled", "SKIP_REASONS"]
