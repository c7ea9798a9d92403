"""Write a split-aware set of webdataset shards resumably, and read one split back as a map-style dataset.

Layout of a shard directory::

    manifest.json            written last: splits, shards, sample counts, label views (class names, templates)
    stats.json               caption length statistics, label counts, skipped samples by reason
    train-00000.tar          webdataset shard: KEY.png + KEY.json ({"captions", "labels", "label", "split", ...})
    train-00000.done.json    written after its shard is complete: keys, counts, skips of that shard
    val-00000.tar ...

Resuming: :class:`ShardSetWriter` fills the shards of a split in the order of a deterministic
list of planned keys. A shard is complete when its ``.done.json`` exists (it is written after the
``.tar`` is renamed into place). A rerun skips the planned keys that complete shards consumed
and continues with the next shard; a half-written ``.tar.tmp`` is discarded.

:class:`ShardDataset` reads one split: it indexes the tar members once (offsets only, the
json metadata is kept in memory) and decodes an image on each ``__getitem__``.
"""
from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .corpora import BUILDERS
from .datasets import DATASETS
from .formats import add_tar_member, sample_json, to_uint8_chw

MANIFEST = "manifest.json"
STATS = "stats.json"
SPLITS = ("train", "val", "test")
ENV_DATA = "CLIPFORGE_DATA"


@dataclass
class ShardSample:
    """One sample to write: encoded image bytes, captions, integer labels and extra json fields."""

    key: str
    image: bytes
    captions: list[str]
    labels: dict[str, int] = field(default_factory=dict)
    ext: str = "png"
    extra: dict[str, Any] = field(default_factory=dict)


# A producer turns planned keys into, in the same order, either a sample or the reason it was skipped.
Producer = Callable[[Sequence[str]], Iterable["ShardSample | str"]]


class ShardSetWriter:
    """Writes the splits of one dataset into ``out_dir`` as shards of about ``target_bytes`` each."""

    def __init__(self, out_dir: str | os.PathLike, target_bytes: int = 64 << 20):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.target_bytes = target_bytes

    def _done_files(self, split: str) -> list[dict[str, Any]]:
        """The completion records of ``split``'s consecutive complete shards, in order."""
        done, i = [], 0
        while (self.out / f"{split}-{i:05d}.done.json").exists() and (self.out / f"{split}-{i:05d}.tar").exists():
            done.append(json.loads((self.out / f"{split}-{i:05d}.done.json").read_text()))
            i += 1
        return done

    def write_split(self, split: str, keys: Sequence[str], produce: Producer,
                    progress: Callable[[int], None] | None = None) -> dict[str, int]:
        """Write ``split`` from its planned ``keys``; returns {"resumed_shards", "written_shards", "samples"}."""
        done = self._done_files(split)
        consumed = sum(d["consumed"] for d in done)
        for d in done:  # the plan must not have changed under a resumed build
            lo = d["first_planned"]
            if keys[lo : lo + d["consumed"]] and keys[lo] != d["first_key_planned"]:
                raise ValueError(f"{self.out}: shard {d['file']} was built from a different plan; "
                                 "remove the directory or choose another --out")
        for stale in self.out.glob(f"{split}-*.tar.tmp"):
            stale.unlink()
        index, written = len(done), 0
        remaining = keys[consumed:]
        if progress is not None and consumed:
            progress(consumed)
        tar, tmp, shard_keys, skipped, size, first = None, None, [], Counter(), 0, consumed
        produced = 0

        def close() -> None:
            nonlocal tar, index, written, shard_keys, skipped, size, first
            tar.close()
            final = tmp.with_suffix("")  # drop .tmp
            os.replace(tmp, final)
            record = {"file": final.name, "count": len(shard_keys), "bytes": final.stat().st_size,
                      "consumed": produced + consumed - first, "first_planned": first,
                      "first_key_planned": keys[first] if first < len(keys) else None,
                      "skipped": dict(skipped), "keys": shard_keys}
            (self.out / f"{split}-{index:05d}.done.json").write_text(json.dumps(record))
            index, written, first = index + 1, written + 1, produced + consumed
            tar, shard_keys, skipped, size = None, [], Counter(), 0

        for planned, result in zip(remaining, produce(remaining)):
            produced += 1
            if progress is not None:
                progress(1)
            if isinstance(result, str):
                skipped[result] += 1
            else:
                if result.key != planned:
                    raise RuntimeError(f"producer returned '{result.key}' for planned key '{planned}'")
                if tar is None:
                    tmp = self.out / f"{split}-{index:05d}.tar.tmp"
                    tar = tarfile.open(tmp, "w")
                add_tar_member(tar, f"{result.key}.{result.ext}", result.image)
                meta = sample_json(result.captions, result.labels, split, **result.extra)
                add_tar_member(tar, f"{result.key}.json", meta)
                shard_keys.append(result.key)
                size += len(result.image) + len(meta) + 1024
            if tar is not None and size >= self.target_bytes:
                close()
        if produced != len(remaining):
            raise RuntimeError(f"producer yielded {produced} results for {len(remaining)} keys")
        if tar is not None:
            close()
        elif skipped:  # trailing skips after the last shard: remember them in an empty record
            record = {"file": None, "count": 0, "bytes": 0, "consumed": produced + consumed - first,
                      "first_planned": first, "first_key_planned": keys[first], "skipped": dict(skipped), "keys": []}
            (self.out / f"{split}-trailing.skips.json").write_text(json.dumps(record))
        return {"resumed_shards": len(done), "written_shards": written, "samples": len(keys)}

    def finish(self, name: str, label_views: dict[str, dict[str, Any]], skipped: Counter | dict | None = None,
               info: dict[str, Any] | None = None, extra_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write ``stats.json`` (read back from the shards) and then ``manifest.json``; return the manifest."""
        splits: dict[str, Any] = {}
        skips = Counter(skipped or {})
        for split in SPLITS:
            done = self._done_files(split)
            trailing = self.out / f"{split}-trailing.skips.json"
            if trailing.exists():
                skips.update(json.loads(trailing.read_text())["skipped"])
            if not done:
                continue
            for d in done:
                skips.update(d["skipped"])
            splits[split] = {"count": sum(d["count"] for d in done),
                             "shards": [{"file": d["file"], "count": d["count"], "bytes": d["bytes"]} for d in done]}
        stats = shard_statistics(self.out, splits, label_views)
        stats["skipped"] = dict(sorted(skips.items()))
        stats.update(extra_stats or {})
        (self.out / STATS).write_text(json.dumps(stats, indent=2, ensure_ascii=False))
        manifest = {"name": name, "format": "clipforge-shards-1", "label_views": label_views, "splits": splits,
                    "total": sum(s["count"] for s in splits.values()), **(info or {})}
        tmp = self.out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        os.replace(tmp, self.out / MANIFEST)
        return manifest


def _iter_json(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with tarfile.open(path) as tar:
        for m in tar:
            if m.isfile() and m.name.endswith(".json"):
                yield m.name[: -len(".json")], json.loads(tar.extractfile(m).read())


def _length_summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    arr = np.asarray(values)
    return {"n": len(values), "mean": round(float(arr.mean()), 2), "min": int(arr.min()),
            "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)), "max": int(arr.max())}


def shard_statistics(out: Path, splits: dict[str, Any], label_views: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Caption lengths (characters and words, per language where known) and label counts per split."""
    chars, words, per_image = [], [], []
    by_lang: dict[str, list[int]] = {}
    labels: dict[str, dict[str, Counter]] = {}
    for split, info in splits.items():
        counts = labels.setdefault(split, {v: Counter() for v in label_views})
        for shard in info["shards"]:
            for _, meta in _iter_json(out / shard["file"]):
                caps = meta["captions"]
                per_image.append(len(caps))
                langs = meta.get("caption_langs") or [None] * len(caps)
                for c, lang in zip(caps, langs):
                    chars.append(len(c))
                    words.append(len(c.split()))
                    if lang is not None:
                        by_lang.setdefault(lang, []).append(len(c))
                for view, value in meta.get("labels", {}).items():
                    classes = label_views.get(view, {}).get("classes")
                    counts.setdefault(view, Counter())[classes[value] if classes else str(value)] += 1
    return {
        "samples": {s: i["count"] for s, i in splits.items()},
        "captions": {"per_image": _length_summary(per_image), "characters": _length_summary(chars),
                     "words": _length_summary(words),
                     **({"characters_by_language": {k: _length_summary(v) for k, v in sorted(by_lang.items())}}
                        if by_lang else {})},
        "labels": {s: {v: dict(c.most_common()) for v, c in views.items()} for s, views in labels.items()},
    }


# ---------------------------------------------------------------- reading


class DataNotBuiltError(FileNotFoundError):
    """A shard directory has no ``manifest.json``; the message says how to build it."""


def data_home() -> Path:
    """Where corpora live by default: ``$CLIPFORGE_DATA`` or ``~/.cache/clipforge/data``."""
    return Path(os.environ.get(ENV_DATA) or Path.home() / ".cache" / "clipforge" / "data")


def corpus_root(name: str, root: str | os.PathLike | None = None) -> Path:
    """The shard directory of corpus ``name``: ``root`` if given, else ``data_home() / name``."""
    return Path(root).expanduser() if root is not None else data_home() / name


def read_manifest(root: str | os.PathLike, name: str | None = None) -> dict[str, Any]:
    """The manifest of a shard directory, or a :class:`DataNotBuiltError` naming the build command."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        what = name or root.name
        partial = " (a build there did not finish; the same command resumes it)" if any(root.glob("*.tar*")) else ""
        raise DataNotBuiltError(f"dataset '{what}' is not built at {root}{partial}: "
                                f"run `clipforge data build {what} --out {root}`")
    return json.loads(path.read_text())


@dataclass
class ShardEntry:
    """One sample of a shard file: its json metadata and where its image bytes lie in the tar."""

    key: str
    meta: dict[str, Any]
    offset: int
    size: int
    ext: str


def shard_entries(path: str | os.PathLike) -> list[ShardEntry]:
    """The samples of one shard tar in their stored order, each with the byte range of its image
    (read without unpacking: ``f.seek(offset); f.read(size)``). A metadata record without an
    image is an error naming the key and the file."""
    images: dict[str, tarfile.TarInfo] = {}
    metas: list[tuple[str, dict[str, Any]]] = []
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if ext == "json":
                metas.append((key, json.loads(tar.extractfile(m).read())))
            else:
                images[key] = m
    out = []
    for key, meta in metas:
        m = images.get(key)
        if m is None:
            raise ValueError(f"shard '{path}' has metadata for '{key}' but no image; rebuild the shard set")
        out.append(ShardEntry(key, meta, m.offset_data, m.size, m.name.partition(".")[2].lower()))
    return out


class ShardDataset(Dataset):
    """One split of a shard directory as a map-style dataset.

    Items: ``{"image": uint8 [3, S, S], "captions": [...], "labels": {view: int}, "key": str}``, plus
    ``caption_langs`` (one per caption) and ``caption_sources`` where the samples store them.
    ``size`` keeps at most that many samples (a seeded random subset, in shard order);
    ``image_size`` resizes (shortest side, center crop) when the stored size differs;
    ``languages`` keeps only captions in those languages where samples tag them (``caption_langs``),
    and drops the samples that have none.
    ``label_views`` ({view: {"classes", "templates"}}) and ``classnames`` ({view: [names]}) serve
    zero-shot evaluation.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", size: int | None = None, seed: int = 0,
                 image_size: int | None = None, languages: Sequence[str] | None = None, name: str | None = None):
        self.root = Path(root)
        self.manifest = read_manifest(self.root, name)
        if split not in self.manifest["splits"]:
            raise KeyError(f"split '{split}' not in {self.root}; available: {sorted(self.manifest['splits'])}")
        self.split, self.image_size = split, image_size
        self.languages = set(languages) if languages is not None else None
        self.label_views: dict[str, dict[str, Any]] = self.manifest["label_views"]
        self.classnames = {v: list(spec["classes"]) for v, spec in self.label_views.items()}
        self.files = [self.root / s["file"] for s in self.manifest["splits"][split]["shards"]]
        self._index: list[tuple[int, int, int]] = []  # (shard, offset, size) of each image
        self._meta: list[dict[str, Any]] = []
        for si, path in enumerate(self.files):
            for entry in shard_entries(path):
                self._meta.append({**entry.meta, "key": entry.key})
                self._index.append((si, entry.offset, entry.size))
        n = len(self._meta)
        keep = np.arange(n)
        if size is not None and size < n:
            keep = np.sort(np.random.default_rng(seed).permutation(n)[:size])
        if self.languages is not None:  # samples left without a caption in those languages are dropped
            keep = np.array([j for j in keep if not self._meta[j].get("caption_langs")
                             or self.languages & set(self._meta[j]["caption_langs"])], dtype=np.int64)
        self._keep = keep
        self._handles: dict[int, Any] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self._keep)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # fresh handles in each DataLoader worker
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(shard)
        if f is None:
            f = self._handles[shard] = open(self.files[shard], "rb")
        f.seek(offset)
        return f.read(size)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None
        return state

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0 or index >= len(self._keep):
            raise IndexError(index)
        j = int(self._keep[index])
        meta = self._meta[j]
        image = to_uint8_chw(self._read(*self._index[j]))
        if self.image_size is not None and tuple(image.shape[1:]) != (self.image_size, self.image_size):
            from ..images import load_image
            from ..transforms import center_crop, resize_shortest

            pil = center_crop(resize_shortest(load_image(image), self.image_size), self.image_size)
            image = torch.from_numpy(np.ascontiguousarray(np.asarray(pil, dtype=np.uint8).transpose(2, 0, 1)))
        captions, langs = list(meta["captions"]), meta.get("caption_langs")
        if self.languages is not None and langs:
            kept = [(c, lang) for c, lang in zip(captions, langs) if lang in self.languages]
            captions, langs = [c for c, _ in kept], [lang for _, lang in kept]
        item = {"image": image, "captions": captions, "labels": dict(meta.get("labels", {})), "key": meta["key"]}
        if langs:  # the language of each caption (emoji), e.g. Symile's third view
            item["caption_langs"] = list(langs)
        if meta.get("caption_sources"):  # stored caption sources, e.g. HQ-CLIP's negative_descriptions
            item["caption_sources"] = dict(meta["caption_sources"])
        if meta.get("negatives"):  # typed hard negatives stored with the sample (e.g. shapes)
            item["negatives"] = {k: list(v) for k, v in meta["negatives"].items()}
        if meta.get("regions") is not None:  # a region corpus: boxes + one caption per box (data.regions)
            from .regions import regions_from_json

            item.update(regions_from_json(meta["regions"], where=f"{self.root}: sample {meta['key']}"))
        return item


def _corpus_factory(name: str):
    def build(split: str = "train", size: int | None = None, seed: int = 0, image_size: int | None = 64,
              root: str | os.PathLike | None = None, **kw) -> ShardDataset:
        return ShardDataset(corpus_root(name, root), split=split, size=size, seed=seed, image_size=image_size,
                            name=name, **kw)

    build.__doc__ = f"The built '{name}' corpus (``clipforge data build {name}``) at ``root`` or the data home."
    return build


for _name, _corpus in BUILDERS.items():
    if _corpus.dataset is not None:
        DATASETS.register(_corpus.dataset, _corpus_factory(_name))


@DATASETS.register("shards")
def _shards(root: str | os.PathLike, split: str = "train", size: int | None = None, seed: int = 0,
            image_size: int | None = 64, **kw) -> ShardDataset:
    """Any shard directory written by :class:`ShardSetWriter` (``root`` is required)."""
    return ShardDataset(root, split=split, size=size, seed=seed, image_size=image_size, **kw)
