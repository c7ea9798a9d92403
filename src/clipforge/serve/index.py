"""A search index on disk: image embeddings, a metadata table and a manifest; built incrementally.

Layout of an index directory::

    manifest.json       written last: format, the model (source, weights hash, dim), count, dtype, sources
    embeddings.npy      [N, dim] L2-normalized image embeddings (float16 by default, or float32)
    metadata.parquet    one row per embedding, in the same order: id, key, kind, path, offset, length,
                        mtime_ns, ext, caption, description

A *description index* (``clipforge index CAPTIONER --describe``, :mod:`clipforge.serve.describe`) stores,
instead of image embeddings, sentence-encoder embeddings of a scene description generated for each
image (the ``description`` column; ``None`` in image-embedding indexes) and names its captioner and
sentence encoder in the manifest's ``describe`` record.

``kind`` is ``file`` (an image file: ``path`` is its absolute path, ``length`` its size in bytes,
``mtime_ns`` its modification time) or ``corpus`` (a sample of a built corpus: ``path`` is its
webdataset shard, ``offset``/``length`` the image member's bytes inside it, ``mtime_ns`` the
shard's modification time (0 in indexes written before it was recorded), ``key`` is
``NAME/SPLIT/KEY``). An item's id is its row number in this version of the index.

Incremental builds: a file whose path, size and modification time match a row is not embedded
again; a changed file is re-embedded; an indexed file under a re-indexed folder that no longer
exists is dropped. Corpus samples are keyed by corpus, split and sample key. Unreadable images
are skipped and counted (and tried again on the next run). Every ``commit_every`` new images the
index is written out, so an interrupted build keeps what it embedded.

An index belongs to one model: the manifest records the SHA-256 of the model's weights
(:func:`weights_sha256`), and adding to an index with other weights is refused with a message
naming both models, because embeddings of different models are not comparable.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..data.image_files import find_images
from .ann import ANN_FILE, KINDS, RECALL_TARGET, choose_index, parse_memory

log = logging.getLogger(__name__)

FORMAT = "clipforge-index-1"
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
METADATA = "metadata.parquet"
COLUMNS = ("key", "kind", "path", "offset", "length", "mtime_ns", "ext", "caption", "description")


class IndexNotFoundError(FileNotFoundError):
    """No usable index at a path (missing, half-written or another format); the message says what to run."""


class ModelMismatchError(ValueError):
    """The model at hand is not the one an index was built with."""


class ItemChangedError(FileNotFoundError):
    """An indexed image is no longer what the index recorded (it resolves elsewhere, or was replaced)."""


# ---------------------------------------------------------------- model identity


def weights_sha256(model) -> str:
    """SHA-256 of a model's weights: every state-dict entry's name, dtype, shape and bytes, sorted by name.

    It identifies the weights whatever file format they came from (a run directory, a
    checkpoint, a Hugging Face or OpenCLIP file), so an index can check that the model
    encoding queries is the one that encoded its images.
    """
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def resolve_model_source(source: str | os.PathLike) -> str:
    """The checkpoint a source loads today: a run directory's newest checkpoint, else the source itself."""
    path = Path(source)
    latest = path / "checkpoints" / "latest.json"
    if latest.exists():
        return str((path / "checkpoints" / json.loads(latest.read_text())["path"]).resolve())
    return str(path.resolve()) if path.exists() else str(source)


def model_info(model, source: str | os.PathLike | None) -> dict[str, Any]:
    """The manifest's ``model`` record: source, the checkpoint it resolved to, weights hash, dimensions."""
    return {
        "source": str(Path(source).resolve()) if source is not None and Path(source).exists() else (
            str(source) if source is not None else None),
        "resolved": resolve_model_source(source) if source is not None else None,
        "weights_sha256": weights_sha256(model),
        "embed_dim": int(model.cfg.embed_dim),
        "image_size": int(model.image_size),
    }


def describe_model(info: dict[str, Any]) -> str:
    """'SOURCE (checkpoint C, weights sha256 abcdef012345)' for error messages."""
    where = info.get("source") or "<a model object>"
    resolved = info.get("resolved")
    at = f" checkpoint {resolved}," if resolved and resolved != where else ""
    return f"{where} ({at} weights sha256 {info['weights_sha256'][:12]})".replace("( ", "(")


def check_same_model(index_dir: Path, built: dict[str, Any], current: dict[str, Any], fix: str) -> None:
    """Raise :class:`ModelMismatchError` naming both models and ``fix`` unless the weights hashes agree."""
    if built["weights_sha256"] != current["weights_sha256"]:
        raise ModelMismatchError(
            f"index {index_dir} was built with {describe_model(built)}, but the model given is "
            f"{describe_model(current)}. Embeddings of different weights are not comparable. {fix}")


# ---------------------------------------------------------------- reading


@dataclass
class IndexData:
    """An index loaded in memory: ``embeddings`` [N, dim] (as stored), ``meta`` (column -> list), ``manifest``."""

    root: Path
    manifest: dict[str, Any]
    embeddings: np.ndarray  # memory-mapped, read-only
    meta: dict[str, list]
    ann: Any = None  # the faiss ANN index the manifest records (read with the same generation), or None

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def row(self, i: int) -> dict[str, Any]:
        return {"id": i, **{c: self.meta[c][i] for c in COLUMNS}}


def _empty_meta() -> dict[str, list]:
    return {c: [] for c in COLUMNS}


class _Changing(Exception):
    """The index changed while it was being read: read it again."""


def _read_once(root: Path) -> IndexData:
    import pyarrow.parquet as pq

    try:
        first = (root / MANIFEST).read_text()
        manifest = json.loads(first)
        embeddings = np.load(root / EMBEDDINGS, mmap_mode="r")  # memory-mapped: pages read as searches touch them
        table = pq.read_table(root / METADATA)
        ann = _read_ann(root, manifest)
        second = (root / MANIFEST).read_text()
    except (FileNotFoundError, json.JSONDecodeError, ValueError, OSError, RuntimeError) as e:
        raise _Changing(str(e)) from None
    if first != second:  # a writer replaced the arrays while they were read
        raise _Changing("manifest changed during the read")
    if manifest.get("format") != FORMAT:
        raise IndexNotFoundError(f"'{root}/manifest.json' has format {manifest.get('format')!r}, not {FORMAT!r}")
    # indexes written before the description column existed read as having none
    meta = {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows for c in COLUMNS}
    n = manifest["count"]
    if embeddings.shape != (n, manifest["dim"]) or table.num_rows != n:
        raise IndexNotFoundError(
            f"index '{root}' is inconsistent: manifest says {n} x {manifest['dim']}, embeddings.npy holds "
            f"{embeddings.shape} and metadata.parquet {table.num_rows} rows (an interrupted write?). "
            "Rerun the `clipforge index` command that built it, with --rebuild.")
    return IndexData(root, manifest, embeddings, meta, ann)


def ann_kind(manifest: dict[str, Any]) -> str | None:
    """The stored ANN index type of a manifest (``ivf``, ``ivfpq``, ``hnsw``), or None (flat or none)."""
    record = manifest.get("ann") or {}
    kind = record.get("spec", {}).get("kind")
    return kind if kind and kind != "flat" else None


def _read_ann(root: Path, manifest: dict[str, Any]):
    if ann_kind(manifest) is None:
        return None
    try:
        import faiss
    except ImportError:  # searched exactly instead (Searcher says so)
        return None
    return faiss.read_index(str(root / ANN_FILE))


def open_index(index_dir: str | os.PathLike, wait: float = 30.0) -> IndexData:
    """Load an index directory, or raise :class:`IndexNotFoundError` that says how to build one.

    An index being rewritten (by ``clipforge index``, which holds its lock) is read again until
    one whole version is read: the old or the new one, never arrays of one with the manifest of
    the other. ``wait``: how many seconds to keep trying while a writer is at work.
    """
    root = Path(index_dir)
    if not root.exists():
        raise IndexNotFoundError(f"no index at '{root}': build one with "
                                 f"`clipforge index MODEL --images DIR --out {root}` (or --corpus NAME --split test)")
    deadline = time.monotonic() + max(wait, 0.0)
    quiet_tries = 0
    while True:
        if (root / MANIFEST).exists():
            try:
                return _read_once(root)
            except _Changing as e:
                reason = str(e)
        else:
            reason = "no manifest.json"
        # between a writer's removal of the manifest and its new one, or a file replaced under the read
        writing = _writer_active(root)
        quiet_tries = 0 if writing else quiet_tries + 1
        if time.monotonic() > deadline or quiet_tries > 20:  # no writer: ~1 s of retries, then say what is wrong
            break
        time.sleep(0.05)
    if not (root / MANIFEST).exists():
        what = "a directory without manifest.json" if root.is_dir() else "not a directory"
        partial = (" (an interrupted first build? rerun the same `clipforge index` command)"
                   if (root / EMBEDDINGS).exists() else "")
        raise IndexNotFoundError(f"'{root}' is not a clipforge index: {what}{partial}. Build one with "
                                 f"`clipforge index MODEL --images DIR --out {root}`")
    raise IndexNotFoundError(f"index '{root}' could not be read whole ({reason}); it is being rewritten or damaged. "
                             "Try again, or rerun the `clipforge index` command that built it, with --rebuild.")


def _writer_active(root: Path) -> bool:
    """Whether the index lock file names a holder (a clean release empties it) that may still run."""
    import socket

    from ..locking import LOCK_NAME, holder_info, pid_alive

    try:
        text = (root / LOCK_NAME).read_text(errors="replace")
    except OSError:
        return False
    if not text.strip():
        return False
    h = holder_info(text)
    if h["host"] == socket.gethostname() and h["pid"].isdigit():
        return pid_alive(int(h["pid"]))
    return True


def indexed_roots(manifest: dict[str, Any]) -> list[str]:
    """The folders an index was built from (resolved when they were indexed), from its ``sources``."""
    return [str(p) for s in manifest.get("sources", []) if s.get("kind") == "images" for p in s.get("paths", [])]


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


_FIX = "re-run `clipforge index` to index what is there now"


def _resolve_indexed(row: dict[str, Any], roots: Sequence[str]) -> tuple[str, str]:
    path = os.path.normpath(row["path"])
    real = os.path.realpath(path)
    if real != path and not (row["kind"] == "file" and _inside(real, roots)):
        raise ItemChangedError(f"item {row['key']!r}: {path} now resolves outside the indexed folders "
                               f"(a symlink put there after indexing?); not served. If that is intended, {_FIX}")
    return path, real


def _check_stat(row: dict[str, Any], path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ItemChangedError(f"item {row['key']!r}: {path} is not a regular file any more; not served")
    if row["kind"] == "corpus":
        changed = ((row["mtime_ns"] and st.st_mtime_ns != row["mtime_ns"])
                   or st.st_size < row["offset"] + row["length"])
    else:
        changed = st.st_size != row["length"] or st.st_mtime_ns != row["mtime_ns"]
    if changed:
        raise ItemChangedError(f"item {row['key']!r}: {path} changed since it was indexed (its size or modification "
                               f"time differ); not served. To serve the new file, {_FIX}")


def check_indexed_file(row: dict[str, Any], roots: Sequence[str] = ()) -> os.stat_result:
    """The ``stat`` of one row's file if it is still the one indexed (see :func:`read_indexed_bytes`), else raise."""
    path, real = _resolve_indexed(row, roots)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise FileNotFoundError(f"item {row['key']!r}: {path} no longer exists ({_FIX})") from None
    _check_stat(row, path, st)
    return st


def read_indexed_bytes(row: dict[str, Any], roots: Sequence[str] = ()) -> bytes:
    """The bytes of one row, only if its file is still the one indexed; :class:`ItemChangedError` otherwise.

    The file's real path (symlinks resolved now) must be the recorded path, or for an image file
    lie inside one of ``roots`` (the indexed folders: :func:`indexed_roots`); the file opened
    (without following a symlink) must be a regular file whose size and modification time are
    the recorded ones (for a corpus sample: its shard's time, when recorded, and a byte range
    inside it). A symlink or another file swapped in after indexing is therefore refused, not
    served. A missing file raises ``FileNotFoundError``. Content rewritten with the same size and
    the old modification time restored is not detected (that would take a hash of every file).
    """
    path, real = _resolve_indexed(row, roots)
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"item {row['key']!r}: {path} no longer exists ({_FIX})") from None
    except OSError as e:  # ELOOP: the last component became a symlink between the two calls
        raise ItemChangedError(
            f"item {row['key']!r}: {path} cannot be opened safely ({e.strerror}); not served"
        ) from None
    with os.fdopen(fd, "rb") as f:
        _check_stat(row, path, os.fstat(fd))
        if row["kind"] == "corpus":
            f.seek(row["offset"])
            return f.read(row["length"])
        return f.read()


def read_item_bytes(row: dict[str, Any]) -> bytes:
    """The encoded image bytes of one metadata row (a file, or a member of a corpus shard), unchecked."""
    path = Path(row["path"])
    if not path.exists():
        raise FileNotFoundError(f"item {row['key']!r}: {path} no longer exists (re-run `clipforge index` to update)")
    with open(path, "rb") as f:
        if row["kind"] == "corpus":
            f.seek(row["offset"])
            return f.read(row["length"])
        return f.read()


# ---------------------------------------------------------------- sources


@dataclass
class Candidate:
    """An image to (maybe) embed: its metadata row and how to read it."""

    row: dict[str, Any]
    load: Callable[[], Any]  # returns anything clipforge.images.load_image accepts


def scan_folders(paths: Sequence[str | os.PathLike]) -> tuple[list[Candidate], list[Path]]:
    """Image files under ``paths`` (recursively, by suffix), captioned by a sidecar ``.txt`` if present.

    Returns the candidates and the resolved roots (for dropping rows of deleted files).
    """
    files: list[Path] = []
    roots: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"--images: '{p}' does not exist")
        p = p.resolve()
        roots.append(p)
        if p.is_dir():
            files.extend(find_images(p))
        else:
            files.append(p)
    out, seen = [], set()
    for f in files:
        if f in seen:
            continue
        seen.add(f)
        st = f.stat()
        caption = None
        sidecar = f.with_suffix(".txt")
        if sidecar.exists():
            try:
                lines = [ln.strip() for ln in sidecar.read_text(encoding="utf-8").splitlines() if ln.strip()]
                caption = lines[0] if lines else None
            except (UnicodeDecodeError, OSError):
                caption = None
        row = {"key": f.as_posix(), "kind": "file", "path": f.as_posix(), "offset": -1, "length": st.st_size,
               "mtime_ns": st.st_mtime_ns, "ext": f.suffix.lower().lstrip("."), "caption": caption}
        out.append(Candidate(row, lambda f=f: f))
    return out, roots


def scan_corpus(name: str, split: str, root: str | os.PathLike | None = None,
                languages: Sequence[str] | None = None) -> list[Candidate]:
    """The samples of one split of a built corpus (``clipforge data build NAME``), read from its shards.

    ``caption`` is the sample's first caption (among ``languages`` when the corpus tags languages).
    The shard and byte range of each image are recorded so the server reads it without unpacking.
    """
    from ..data.shards import corpus_root, read_manifest, shard_entries

    base = corpus_root(name, root)
    manifest = read_manifest(base, name)
    if split not in manifest["splits"]:
        raise KeyError(f"split '{split}' not in corpus '{name}' at {base}; available: {sorted(manifest['splits'])}")
    langs = set(languages) if languages else None
    out = []
    for shard in manifest["splits"][split]["shards"]:
        path = (base / shard["file"]).resolve()
        shard_mtime = path.stat().st_mtime_ns
        for entry in shard_entries(path):
            meta = entry.meta
            captions = list(meta.get("captions", []))
            if langs is not None and meta.get("caption_langs"):
                captions = [c for c, lang in zip(captions, meta["caption_langs"]) if lang in langs]
            row = {"key": f"{name}/{split}/{entry.key}", "kind": "corpus", "path": path.as_posix(),
                   "offset": entry.offset, "length": entry.size, "mtime_ns": shard_mtime, "ext": entry.ext,
                   "caption": captions[0] if captions else None}
            out.append(Candidate(row, lambda row=row: read_item_bytes(row)))
    return out


# ---------------------------------------------------------------- building


@dataclass
class BuildReport:
    """What one ``build_index`` call did."""

    index_dir: Path
    added: int = 0  # new images embedded
    updated: int = 0  # changed files re-embedded
    unchanged: int = 0  # skipped: already indexed with the same size and mtime
    removed: int = 0  # rows of files that no longer exist
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of unreadable images
    count: int = 0  # rows in the index afterwards
    seconds: float = 0.0
    ann: dict[str, Any] | None = None  # the manifest's ann record written (None when nothing was written)

    def summary(self) -> str:
        s = (f"index {self.index_dir}: {self.count} images ({self.added} added, {self.updated} re-embedded, "
             f"{self.unchanged} unchanged, {self.removed} removed) in {self.seconds:.1f} s")
        if self.skipped:
            s += f"; skipped {len(self.skipped)} unreadable"
        return s


TMP_SUFFIX = ".tmp"


def _temp_path(root: Path, name: str) -> Path:
    """A fresh temporary file next to ``name`` (``.NAME.RANDOM.tmp``): no two writers ever share one."""
    while True:
        tmp = root / f".{name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
        try:  # created here, exclusively, with the usual permissions (mkstemp's would be 0600)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


def remove_stale_temporaries(root: Path) -> list[str]:
    """Delete temporary files a killed writer left (our ``.NAME.*.tmp`` pattern only); call with the lock held."""
    removed = []
    for name in (EMBEDDINGS, METADATA, MANIFEST, ANN_FILE):
        for p in root.glob(f".{name}.*{TMP_SUFFIX}"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


def _write(root: Path, manifest: dict[str, Any], embeddings: np.ndarray, meta: dict[str, list],
           ann_index: Any = None) -> None:
    """Write the three files, each through a temporary file of its own, the manifest last.

    The manifest is removed before the arrays are replaced and written anew, with a fresh
    ``generation``, after them; :func:`open_index` reads the manifest before and after the
    arrays and retries unless both reads are the same generation, so a reader gets the old or
    the new index whole. Writers are serialized by the index lock (:func:`build_index`); the
    unique temporary names keep even unlocked writers from crashing on each other's files.
    ``ann_index``: a faiss index written to ``ann.faiss`` in the same way; without one, an
    ``ann.faiss`` the manifest does not name any more is removed (before the manifest is written).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    n = embeddings.shape[0]
    types = {"key": pa.string(), "kind": pa.string(), "path": pa.string(), "offset": pa.int64(),
             "length": pa.int64(), "mtime_ns": pa.int64(), "ext": pa.string(), "caption": pa.string(),
             "description": pa.string()}
    table = pa.table({"id": pa.array(np.arange(n, dtype=np.int64)),
                      **{c: pa.array(meta[c], type=types[c]) for c in COLUMNS}})
    names = (EMBEDDINGS, METADATA, MANIFEST) + ((ANN_FILE,) if ann_index is not None else ())
    tmp = {name: _temp_path(root, name) for name in names}
    try:
        with open(tmp[EMBEDDINGS], "wb") as f:
            np.save(f, embeddings)
        pq.write_table(table, tmp[METADATA])
        if ann_index is not None:
            import faiss

            faiss.write_index(ann_index, str(tmp[ANN_FILE]))
        tmp[MANIFEST].write_text(json.dumps({**manifest, "count": n, "generation": uuid.uuid4().hex}, indent=2))
        # the manifest goes first out of the way, so a reader never pairs a new manifest with old arrays
        (root / MANIFEST).unlink(missing_ok=True)
        os.replace(tmp[EMBEDDINGS], root / EMBEDDINGS)
        os.replace(tmp[METADATA], root / METADATA)
        if ann_index is not None:
            os.replace(tmp[ANN_FILE], root / ANN_FILE)
        elif ann_kind(manifest) is None:
            (root / ANN_FILE).unlink(missing_ok=True)
        os.replace(tmp[MANIFEST], root / MANIFEST)
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)


def _under(path: str, roots: Sequence[Path]) -> bool:
    p = Path(path)
    return any(p == r or r in p.parents for r in roots)


def build_index(model, preprocess, out: str | os.PathLike, candidates: Sequence[Candidate], *,
                model_source: str | os.PathLike | None = None, folder_roots: Sequence[Path] = (),
                source: dict[str, Any] | None = None, dtype: str = "float16", batch_size: int = 64,
                rebuild: bool = False, commit_every: int = 10_000, progress: bool = True,
                on_skip: Callable[[str, str], None] | None = None, lock_timeout: float = 0.0,
                index_kind: str = "auto", max_memory: int | str | None = None,
                recall_target: float = RECALL_TARGET, manifest_extra: dict[str, Any] | None = None) -> BuildReport:
    """Embed ``candidates`` into the index at ``out``, creating it or adding to it incrementally.

    ``model``/``preprocess``: as returned by :func:`clipforge.load`. ``folder_roots``: the
    scanned folders; indexed files under them that are not among ``candidates`` any more are
    dropped. ``source``: a record of what was indexed, appended to the manifest's ``sources``.
    ``rebuild``: ignore (and replace) whatever the index held. Raises :class:`ModelMismatchError`
    when the index was built with other weights.

    The whole read-embed-write runs under the index's exclusive lock (``INDEX_DIR/.lock``, see
    :func:`clipforge.locking.exclusive_lock`), so two builders never both add to the same old
    version and lose one's images: the second raises :class:`clipforge.locking.LockHeld` naming
    the holder's pid and host, or with ``lock_timeout`` > 0 waits that many seconds for it and
    then adds to what the first wrote. Temporary files a killed builder left are removed.

    ``index_kind``: ``auto`` (chosen from the collection size and ``max_memory``, see
    :mod:`clipforge.serve.ann`), ``flat``, ``ivf``, ``ivfpq`` or ``hnsw``; the ANN index is
    written as ``ann.faiss`` with the choice, its reason and the tuned search parameter in the
    manifest's ``ann`` record. New rows are added to a trained IVF/HNSW index while the choice
    for the new size is the same one; otherwise it is rebuilt (logged). ``recall_target``: the
    recall@10 the search parameter is tuned for.

    A ``model`` with a ``describe_images(pixels) -> (embeddings, descriptions)`` method (a
    :class:`clipforge.serve.describe.Describer`) builds a description index: each image's generated
    description is embedded and stored in the ``description`` column. ``manifest_extra``: entries added to
    the manifest (the describer's ``describe`` record); an existing index whose entries differ is refused.
    """
    if index_kind not in KINDS:
        raise ValueError(f"--index {index_kind!r} is not an index type; choose one of {', '.join(KINDS)}")
    if index_kind not in ("auto", "flat"):
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise ValueError(f"--index {index_kind} needs faiss: pip install faiss-cpu (or use --index flat, exact "
                             "search with numpy)") from None
    if max_memory is not None:
        max_memory = parse_memory(max_memory)
    if not 0 < recall_target <= 1:
        raise ValueError(f"the recall target must be in (0, 1], got {recall_target}")
    from ..locking import LOCK_NAME, exclusive_lock

    root = Path(out)
    if (not rebuild and root.is_dir() and not (root / MANIFEST).exists() and not (root / EMBEDDINGS).exists()
            and any(p.name != LOCK_NAME for p in root.iterdir())):
        raise ValueError(f"--out {root} exists, is not empty and is not a clipforge index: choose another directory")
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {root} is a file, not an index directory: choose another path")
    with exclusive_lock(root, what="index", timeout=lock_timeout):
        stale = remove_stale_temporaries(root)
        if stale:
            log.warning("index %s: removed %d temporary file(s) left by an interrupted run", root, len(stale))
        return _build_index_locked(model, preprocess, root, candidates, model_source=model_source,
                                   folder_roots=folder_roots, source=source, dtype=dtype, batch_size=batch_size,
                                   rebuild=rebuild, commit_every=commit_every, progress=progress, on_skip=on_skip,
                                   ann_options=(index_kind, max_memory, recall_target),
                                   manifest_extra=dict(manifest_extra or {}))


def _build_index_locked(model, preprocess, root: Path, candidates: Sequence[Candidate], *, model_source,
                        folder_roots, source, dtype, batch_size, rebuild, commit_every, progress,
                        on_skip, ann_options, manifest_extra=None) -> BuildReport:
    import torch
    from tqdm.auto import tqdm

    from ..images import ImageLoadError, load_image

    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got '{dtype}'")
    t0 = time.perf_counter()
    info = model_info(model, model_source)
    report = BuildReport(root)
    sources: list[dict[str, Any]] = []
    old_ann: dict[str, Any] | None = None
    if not rebuild and (root / MANIFEST).exists():
        old = open_index(root)
        check_same_model(root, old.manifest["model"], info,
                         "Index with the model it was built with, or re-embed everything with this one: "
                         "add --rebuild (or choose another --out).")
        for key, value in (manifest_extra or {}).items():
            if old.manifest.get(key) != value:
                raise ModelMismatchError(
                    f"index {root} records {key}={old.manifest.get(key)!r}, this run {value!r}: its embeddings are "
                    "not comparable. Add --rebuild to re-embed everything, or choose another --out.")
        if old.manifest["dtype"] != dtype:
            raise ValueError(f"index {root} stores {old.manifest['dtype']} embeddings; pass --dtype "
                             f"{old.manifest['dtype']} to add to it, or --rebuild to convert it")
        embeddings, meta = old.embeddings, old.meta
        sources = list(old.manifest.get("sources", []))
        old_ann = old.manifest.get("ann")
    elif (not rebuild and root.exists() and not (root / EMBEDDINGS).exists()
          and any(p.name != ".lock" for p in root.iterdir())):
        raise ValueError(f"--out {root} exists, is not empty and is not a clipforge index: choose another directory")
    else:
        embeddings, meta = np.zeros((0, info["embed_dim"]), dtype=dtype), _empty_meta()

    # decide what to keep, what to (re-)embed and what to drop
    by_key = {k: i for i, k in enumerate(meta["key"])}
    wanted = {c.row["key"] for c in candidates}
    drop: set[int] = set()
    todo: list[Candidate] = []
    captions_edited = False
    for c in candidates:
        i = by_key.get(c.row["key"])
        if (i is not None and c.row["kind"] == "corpus" and meta["mtime_ns"][i] == 0
                and meta["length"][i] == c.row["length"]):
            # indexed before shard times were recorded: adopt the shard's time instead of re-embedding
            meta["mtime_ns"][i] = c.row["mtime_ns"]
            captions_edited = True
        if i is not None and meta["length"][i] == c.row["length"] and meta["mtime_ns"][i] == c.row["mtime_ns"]:
            report.unchanged += 1
            if meta["caption"][i] != c.row["caption"]:  # a sidecar caption edited: no need to re-embed
                meta["caption"][i] = c.row["caption"]
                captions_edited = True
            continue
        if i is not None:  # changed since it was indexed: its old row goes, its new embedding is appended
            drop.add(i)
        todo.append(c)
    deleted = 0
    for i, (kind, path, key) in enumerate(zip(meta["kind"], meta["path"], meta["key"])):
        if kind == "file" and key not in wanted and _under(path, folder_roots) and not Path(path).exists():
            drop.add(i)
            deleted += 1
    keep = [i for i in range(len(meta["key"])) if i not in drop]
    base_emb = embeddings[keep]
    base_meta = {c: [meta[c][i] for i in keep] for c in COLUMNS}
    new_source = source is not None and source not in sources
    if new_source:
        sources.append(source)
    manifest = {"format": FORMAT, "model": info, "dim": info["embed_dim"], "dtype": dtype, "normalized": True,
                "sources": sources, **(manifest_extra or {})}

    index_kind, max_memory, recall_target = ann_options
    requested = {"index": index_kind, "max_memory": max_memory, "recall_target": recall_target}
    # the budget is checked before anything is embedded: a choice that cannot be made fails now, not after hours
    choose_index(len(keep) + len(todo), info["embed_dim"], max_memory, index_kind)
    ann_changed = old_ann is None or old_ann.get("requested") != requested
    # rows keep their ids while nothing is dropped: the stored ANN index stays valid for the rows it covers
    prefix_stable = not drop and not rebuild and old_ann is not None

    new_chunks: list[np.ndarray] = []
    new_meta = _empty_meta()

    def commit(final: bool = False) -> None:
        emb = np.concatenate([base_emb, *new_chunks]) if new_chunks else base_emb
        emb = emb.astype(dtype, copy=False)
        merged = {c: base_meta[c] + new_meta[c] for c in COLUMNS}
        ann_index, record = None, (old_ann if prefix_stable else None)
        if final:
            ann_index, record = update_ann(root, emb, old_ann if prefix_stable else None, requested)
            report.ann = record
        _write(root, {**manifest, "ann": record, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, emb, merged,
               ann_index=ann_index)

    describe = getattr(model, "describe_images", None)
    was_training = model.training
    model.eval()
    since_commit = 0
    bar = tqdm(total=len(todo), desc="embed images", unit="img", disable=not progress or not todo)
    try:
        for start in range(0, len(todo), batch_size):
            pixels, rows = [], []
            for c in todo[start:start + batch_size]:
                try:
                    pixels.append(preprocess(load_image(c.load())))
                    rows.append(c.row)
                except (ImageLoadError, OSError) as e:
                    reason = str(e)
                    report.skipped.append((c.row["key"], reason))
                    if on_skip is not None:
                        on_skip(c.row["key"], reason)
            if pixels:
                descriptions: list[str | None] = [None] * len(rows)
                with torch.no_grad():
                    if describe is not None:
                        emb, descriptions = describe(torch.stack(pixels))
                        emb = np.asarray(emb, dtype=np.float32)
                    else:
                        emb = model.encode_image(torch.stack(pixels)).float().numpy()
                new_chunks.append(emb.astype(dtype))
                for r, text in zip(rows, descriptions):
                    for col in COLUMNS:
                        new_meta[col].append(text if col == "description" else r.get(col))
                since_commit += len(rows)
            bar.update(len(todo[start:start + batch_size]))
            if since_commit >= commit_every:
                commit()
                since_commit = 0
    finally:
        bar.close()
        model.train(was_training)
    report.updated = sum(1 for k in new_meta["key"] if k in by_key)
    report.added = len(new_meta["key"]) - report.updated
    # rows dropped: deleted files, and changed files that are now unreadable (their old embedding is stale)
    report.removed = deleted + sum(1 for k, _ in report.skipped if k in by_key)
    if todo or drop or captions_edited or new_source or rebuild or ann_changed or not (root / MANIFEST).exists():
        commit(final=True)
    report.count = len(base_meta["key"]) + len(new_meta["key"])
    report.seconds = time.perf_counter() - t0
    return report


def update_ann(root: Path, embeddings: np.ndarray, old: dict[str, Any] | None,
               requested: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The ANN index for ``embeddings`` and its manifest record: the old one extended, or a new one.

    ``old``: the record of the stored ``ann.faiss`` whose rows are still rows ``0..old['count']``
    of ``embeddings`` (None after a rebuild or when rows were dropped). Returns ``(None, record)``
    for a flat choice (nothing stored).

    With ``--index auto``, an HNSW graph whose tuning cannot reach the recall target even at the
    largest efSearch (data close to isotropic noise, where graph search does worst) is replaced by
    IVF-Flat, which probing every list makes exact and so always reaches it; the record's
    ``fallback`` says why, and later updates of the index stay with IVF instead of building the
    graph again. An HNSW index asked for by name is kept, with a warning.
    """
    from . import ann as annlib

    n, d = embeddings.shape
    spec = annlib.choose_index(n, d, requested["max_memory"], requested["index"])
    auto_hnsw = requested["index"] == "auto" and spec.kind == "hnsw"
    fallback = (old or {}).get("fallback") if auto_hnsw else None
    if fallback:
        spec = _ivf_instead_of_hnsw(n, d, requested, f"an earlier build's hnsw missed the recall target "
                                                     f"({fallback['recall_at_10']:.3f} at ef_search "
                                                     f"{fallback['ef_search']})") or spec
    log.info("index %s: %s", root, spec.reason)
    index, record = _build_or_extend(root, embeddings, old, requested, spec)
    if index is None:  # flat: searched exactly, nothing to tune
        return None, record
    tuning = _tune(root, index, record, embeddings, requested)
    if auto_hnsw and spec.kind == "hnsw" and tuning.recall < requested["recall_target"]:
        why = (f"hnsw reached recall@10 {tuning.recall:.3f} < the target {requested['recall_target']} even at "
               f"ef_search {tuning.value}")
        ivf = _ivf_instead_of_hnsw(n, d, requested, why)
        if ivf is not None:
            log.warning("index %s: %s: building %s instead (exact when every list is probed)", root, why,
                        ivf.factory())
            fallback = {"from": "hnsw", "recall_at_10": round(tuning.recall, 4), "ef_search": tuning.value,
                        "tuning": record["tuning"], "build_seconds": record["build_seconds"]}
            index, record = _build_or_extend(root, embeddings, None, requested, ivf)
            tuning = _tune(root, index, record, embeddings, requested)
    if fallback and record["spec"]["kind"] == "ivf":
        record["fallback"] = fallback
    return index, record


def _ivf_instead_of_hnsw(n: int, d: int, requested: dict[str, Any], why: str):
    """The IVF-Flat spec that replaces an auto-chosen HNSW (None when it does not fit the budget)."""
    from . import ann as annlib

    try:
        ivf = annlib.choose_index(n, d, requested["max_memory"], "ivf")
    except annlib.IndexBudgetError:
        log.warning("index: %s, and IVF-Flat does not fit --max-memory either: keeping hnsw", why)
        return None
    reason = f"auto: ivf ({ivf.factory()}) for {n:,} vectors of dimension {d}; {why}"
    return annlib.AnnSpec(**{**ivf.to_dict(), "reason": reason})


def _build_or_extend(root: Path, embeddings: np.ndarray, old: dict[str, Any] | None, requested: dict[str, Any],
                     spec) -> tuple[Any, dict[str, Any]]:
    """``spec``'s index over ``embeddings``: the stored one of ``old`` with the new rows added when it is the
    same type and has not been outgrown, else a new one. ``(None, record)`` for flat."""
    from . import ann as annlib

    n = embeddings.shape[0]
    record: dict[str, Any] = {"spec": spec.to_dict(), "requested": requested, "count": n}
    if spec.kind == "flat":
        return None, record
    t0 = time.perf_counter()
    prev = (old or {}).get("spec", {})
    reuse = (old is not None and prev.get("kind") == spec.kind and prev.get("m") == spec.m
             and prev.get("hnsw_m") == spec.hnsw_m and spec.nlist <= 2 * max(prev.get("nlist", 0), 1)
             and (root / ANN_FILE).exists())
    index = None
    if reuse:
        import faiss

        index = faiss.read_index(str(root / ANN_FILE))
        if index.ntotal != old["count"] or index.ntotal > n:
            log.warning("index %s: ann.faiss holds %d vectors, not the %d recorded: rebuilding it", root,
                        index.ntotal, old["count"])
            index = None
    if index is not None:
        added = n - index.ntotal
        annlib.add(index, embeddings, index.ntotal)
        spec = annlib.AnnSpec(**{**prev, "n": n, "reason": prev.get("reason", "") + f"; {added} vectors added"})
        record["spec"] = spec.to_dict()
        record["trained_on"] = old.get("trained_on", old["count"])
        log.info("index %s: added %d vectors to the trained %s index (%s)", root, added, spec.kind, spec.factory())
    else:
        if old is not None and prev.get("kind") not in (None, "flat"):
            log.info("index %s: rebuilding the %s index (%s) as %s: the collection of %d vectors outgrew it or "
                     "the options changed", root, prev.get("kind"), prev.get("nlist"), spec.factory(), n)
        index = annlib.build(embeddings, spec)
        record["trained_on"] = n
    record["build_seconds"] = round(time.perf_counter() - t0, 2)
    return index, record


def _tune(root: Path, index, record: dict[str, Any], embeddings: np.ndarray, requested: dict[str, Any]):
    """Tune the search parameter of a built (not flat) index into ``record``; returns the tuning."""
    from . import ann as annlib
    from .search import AnnBackend

    kind = record["spec"]["kind"]
    tuning = annlib.tune(index, kind, embeddings, AnnBackend(index, embeddings, record).search,
                         target=requested["recall_target"])
    record["search"] = {tuning.param: tuning.value}
    record["tuned_recall_at_10"] = round(tuning.recall, 4)
    record["tuning"] = {str(k): v for k, v in tuning.tried.items()}
    missed = tuning.recall < requested["recall_target"]
    # an auto-chosen HNSW graph that misses is replaced by IVF-Flat, and update_ann says so: one warning, not two
    quiet = not missed or (requested["index"] == "auto" and kind == "hnsw")
    (log.info if quiet else log.warning)(
        "index %s: %s=%d %s recall@10 %.3f against exact search on %d queries%s", root, tuning.param, tuning.value,
        "gives only" if missed else "reaches", tuning.recall, min(annlib.TUNE_QUERIES, embeddings.shape[0]),
        f", below the target {requested['recall_target']}" if missed else "")
    return tuning
