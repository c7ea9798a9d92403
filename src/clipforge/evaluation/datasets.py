"""Evaluation datasets from the user's own data: ``clipforge eval --dataset SPEC``.

A spec names a reader and a path:

- ``imagefolder:DIR``: one subfolder per class (images anywhere below it). Class names from
  ``DIR/classnames.txt`` (one per line, in sorted-folder order) when present, else the folder
  names with underscores as spaces; templates from ``DIR/templates.txt`` when present.
- ``wds:DIR``: CLIP_benchmark's webdataset layout, ``DIR/<split>/nshards.txt`` and
  ``DIR/<split>/0.tar ... (N-1).tar``; a sample is an image (``webp``, ``png``, ``jpg``,
  ``jpeg``) with ``cls`` (class index) or ``txt`` (captions, one per line);
  ``DIR/classnames.txt``, ``DIR/zeroshot_classification_templates.txt`` and
  ``DIR/dataset_type.txt`` (``retrieval``, else classification). ``DIR/train/`` is the train split.
- ``csv:FILE``, ``jsonl:FILE``, ``parquet:FILE`` (``tsv:`` too): the manifests ``clipforge data
  convert`` reads (an ``image`` column, caption columns ``caption*`` or a list cell; rows that
  name the same image add captions to it), with ``label_column`` a classification set: integer
  labels (class names from ``--classnames``) or text labels (the sorted distinct values).
- ``shards:DIR``: a shard directory written by ``clipforge data build|convert``; the label view
  is ``label_column`` or the first one, and its ``train`` split is the train split.

Reading a spec touches metadata only (file lists, tar member offsets, manifest rows); images
are decoded when they are encoded (:mod:`clipforge.evaluation.loader`), in DataLoader workers.
Records that cannot be used are skipped and counted in the split's :class:`ReadStats` under a
reason (``missing_image``, ``corrupt_image`` for zero-byte or undecodable images, ``bad_row``,
``bad_shard``, ``empty_class``); the counts and a few examples go into the results. A spec
that cannot be read at all raises :class:`DatasetSpecError` with the problem and the fix.
"""
from __future__ import annotations

import hashlib
import json
import math
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.formats import (
    ReadStats,
    as_label,
    clean_captions,
    manifest_rows,
)
from ..data.image_files import IMAGE_SUFFIXES, WDS_IMAGE_KEYS, find_images
from .templates import (
    PromptError,
    read_classnames,
    read_lines,
    read_templates,
    resolve_templates,
)

PREFIXES = ("imagefolder", "wds", "csv", "tsv", "jsonl", "parquet", "shards")
BUILTIN = ("shapes", "openclipart", "emoji")


class DatasetSpecError(ValueError):
    """A ``--dataset`` spec that cannot be read; the message names the problem and the fix."""


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are: a whole file (``offset < 0``) or a byte range of a tar."""

    path: str
    offset: int = -1
    size: int = -1

    def read(self) -> bytes | str:
        """The image's bytes (a tar member) or its path (a file), for :func:`clipforge.images.load_image`."""
        if self.offset < 0:
            return self.path
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass
class EvalSplit:
    """One split of a dataset: image references with labels and/or captions (metadata only)."""

    name: str
    split: str
    refs: list[ImageRef]
    keys: list[str]
    labels: list[int] | None = None
    captions: list[list[str]] | None = None
    classnames: list[str] | None = None
    templates: list[str] | None = None  # in the "{}" form
    stats: ReadStats = field(default_factory=ReadStats)
    failed: set[int] = field(default_factory=set)  # indices whose image did not decode (found while encoding)
    _fingerprint: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def good(self) -> list[int]:
        """Indices of the images that decoded (all of them before encoding)."""
        return [i for i in range(len(self.refs)) if i not in self.failed]

    def fingerprint(self) -> str:
        """SHA-256 over the content of every file the images come from and the exact byte ranges,
        in order: a changed, added or removed image changes it; renaming the folder does not."""
        if self._fingerprint is None:
            digests: dict[str, str] = {}
            h = hashlib.sha256()
            for ref in self.refs:
                if ref.path not in digests:
                    digests[ref.path] = _file_digest(ref.path)
                h.update(f"{digests[ref.path]}:{ref.offset}:{ref.size};".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def mark_failed(self, indices: Sequence[int]) -> None:
        """Record images that failed to decode as ``corrupt_image`` skips (once each)."""
        for i in indices:
            if i not in self.failed:
                self.failed.add(i)
                self.stats.skip("corrupt_image", f"{self.keys[i]}: does not decode as an image")
                self.stats.read -= 1

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"split": self.split, "images": len(self.refs) - len(self.failed)}
        if self.labels is not None:
            out["classes"] = len(self.classnames) if self.classnames else len(set(self.labels))
        if self.captions is not None:
            out["captions"] = sum(len(self.captions[i]) for i in self.good)
        out["skipped"] = dict(sorted(self.stats.skipped.items()))
        if self.stats.examples:
            out["skipped_examples"] = self.stats.examples
        return out


@dataclass
class EvalData:
    """A dataset named by a spec: its evaluation split and, when it has one, a train split."""

    spec: str
    test: EvalSplit
    train: EvalSplit | None = None

    @property
    def name(self) -> str:
        return self.spec

    def summary(self) -> dict[str, Any]:
        out = {"spec": self.spec, "test": self.test.summary()}
        if self.train is not None:
            out["train"] = self.train.summary()
        return out


@dataclass
class SpecOptions:
    """Options that apply to every spec of a run (the ``clipforge eval`` flags of the same names)."""

    split: str = "test"
    templates: str | Sequence[str] = "openai_imagenet"
    classnames: str | None = None
    label_column: str | None = None
    image_column: str = "image"


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_builtin(spec: str) -> bool:
    return ":" not in spec and spec in BUILTIN


def parse_spec(spec: str) -> tuple[str, Path]:
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in PREFIXES or not rest:
        raise DatasetSpecError(f"--dataset {spec!r}: expected a built-in name ({', '.join(BUILTIN)}) or PREFIX:PATH "
                               f"with PREFIX one of {', '.join(PREFIXES)} (e.g. imagefolder:photos/ or csv:pairs.csv)")
    return kind, Path(rest).expanduser()


def load_eval_data(spec: str, options: SpecOptions | None = None) -> EvalData:
    """Read the metadata of ``spec`` (see the module docstring)."""
    options = options or SpecOptions()
    kind, path = parse_spec(spec)
    if not path.exists():
        raise DatasetSpecError(f"--dataset {spec!r}: {path} does not exist; give the path of an existing "
                               f"{'folder' if kind in ('imagefolder', 'wds', 'shards') else 'file'}")
    try:
        if kind == "imagefolder":
            return read_imagefolder(spec, path, options)
        if kind == "wds":
            return read_wds(spec, path, options)
        if kind == "shards":
            return read_shards(spec, path, options)
        return read_manifest_spec(spec, path, options)
    except PromptError as e:
        raise DatasetSpecError(f"--dataset {spec!r}: {e}") from None


def _templates(spec_file: Path | None, options: SpecOptions) -> list[str]:
    if spec_file is not None and spec_file.is_file():
        return read_templates(spec_file)
    return resolve_templates(options.templates)


# ------------------------------------------------------------------------------ image folders
def read_imagefolder(spec: str, root: Path, options: SpecOptions) -> EvalData:
    if not root.is_dir():
        raise DatasetSpecError(f"--dataset {spec!r}: {root} is not a folder; imagefolder: needs a folder with one "
                               "subfolder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetSpecError(f"--dataset {spec!r}: {root} has no class subfolders; put each class's images in "
                               f"{root}/<class name>/")
    stats = ReadStats()
    refs, keys, labels = [], [], []
    for c, name in enumerate(classes):
        files = find_images(root / name)
        if not files:
            stats.skip("empty_class", f"{name}: no images in {root / name}")
        for p in files:
            key = p.relative_to(root).as_posix()
            if p.stat().st_size == 0:
                stats.skip("corrupt_image", f"{key}: zero bytes")
                continue
            refs.append(ImageRef(str(p)))
            keys.append(key)
            labels.append(c)
            stats.read += 1
    if not refs:
        raise DatasetSpecError(f"--dataset {spec!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class "
                               f"folders of {root}; add images to {root}/<class name>/")
    names_file = Path(options.classnames) if options.classnames else root / "classnames.txt"
    if options.classnames or names_file.is_file():
        classnames = read_classnames(names_file, expected=len(classes), what=f"class folders ({', '.join(classes[:5])}"
                                     f"{', ...' if len(classes) > 5 else ''})")
    else:
        classnames = [c.replace("_", " ") for c in classes]
    split = EvalSplit(spec, "test", refs, keys, labels=labels, classnames=classnames,
                      templates=_templates(root / "templates.txt", options), stats=stats)
    return EvalData(spec, split)


# ------------------------------------------------------------------------------ CLIP_benchmark webdataset
def _wds_split(spec: str, root: Path, split: str, options: SpecOptions, retrieval: bool) -> EvalSplit:
    """One split of CLIP_benchmark's webdataset layout, as byte ranges into its tars (nothing is decoded here); a
    sample's image is its first member, in the tar's order, with a key of
    :data:`~clipforge.data.image_files.WDS_IMAGE_KEYS`."""
    folder = root / split
    nfile = folder / "nshards.txt"
    if not nfile.is_file():
        have = sorted(p.name for p in root.iterdir() if (p / "nshards.txt").is_file()) if root.is_dir() else []
        raise DatasetSpecError(
            f"--dataset {spec!r}: {nfile} is missing; CLIP_benchmark's layout needs <split>/nshards.txt with the "
            "number "
            f"of N.tar files{f' (splits found: {have}; choose one with --split)' if have else ''}; write it, or "
            "create the directory with `clipforge data export-wds`"
        )
    try:
        nshards = int(nfile.read_text().strip())
    except ValueError:
        raise DatasetSpecError(f"--dataset {spec!r}: {nfile} must hold one integer (the number of shards), "
                               f"not {nfile.read_text()[:40]!r}") from None
    missing = [f"{i}.tar" for i in range(nshards) if not (folder / f"{i}.tar").is_file()]
    if missing:
        raise DatasetSpecError(f"--dataset {spec!r}: nshards.txt says {nshards} shards but {folder} lacks "
                               f"{', '.join(missing[:3])}; fix nshards.txt or restore the shards")
    stats = ReadStats()
    refs, keys, labels, captions = [], [], [], []
    for i in range(nshards):
        path = folder / f"{i}.tar"
        samples: dict[str, dict[str, Any]] = {}
        order: list[str] = []
        try:
            with tarfile.open(path) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)
                    prefix = base[0] + "/" if len(base) == 2 else ""
                    stem, _, ext = base[-1].partition(".")
                    key = prefix + stem
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    ext = ext.lower()
                    if ext in WDS_IMAGE_KEYS and "image" not in samples[key]:
                        samples[key]["image"] = ImageRef(str(path), m.offset_data, m.size)
                    elif ext in ("cls", "txt"):
                        samples[key][ext] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            stats.skip("bad_shard", f"{path}: {type(e).__name__}: {e}")
        for key in order:
            s, name = samples[key], f"{split}/{i}.tar:{key}"
            if "image" not in s:
                stats.skip("missing_image", f"{name}: no {'/'.join(WDS_IMAGE_KEYS)} member")
                continue
            if s["image"].size == 0:
                stats.skip("corrupt_image", f"{name}: zero bytes")
                continue
            if retrieval:
                caps = [c.strip() for c in s.get("txt", b"").decode("utf-8", "replace").splitlines() if c.strip()]
                if not caps:
                    stats.skip("no_caption", f"{name}: no txt captions")
                    continue
                captions.append(caps)
            else:
                label = as_label(s.get("cls", b"").decode("utf-8", "replace").strip())
                if label is None or label < 0:
                    stats.skip("bad_row", f"{name}: no integer cls member")
                    continue
                labels.append(label)
            refs.append(s["image"])
            keys.append(name)
            stats.read += 1
    if not refs:
        raise DatasetSpecError(f"--dataset {spec!r}: no usable samples in {folder} (skipped: {dict(stats.skipped)}); "
                               "each sample needs an image and a cls (or, for retrieval, txt) member")
    out = EvalSplit(spec, split, refs, keys, stats=stats)
    if retrieval:
        out.captions = captions
        return out
    out.labels = labels
    names_file = Path(options.classnames) if options.classnames else root / "classnames.txt"
    if names_file.is_file():
        names = read_lines(names_file, "class names")
        if max(labels) >= len(names):
            raise DatasetSpecError(f"--dataset {spec!r}: {names_file} has {len(names)} lines but the shards use class "
                                   f"index {max(labels)}; write one name per class, in class-index order")
        out.classnames = names
    out.templates = _templates(root / "zeroshot_classification_templates.txt", options)
    return out


def read_wds(spec: str, root: Path, options: SpecOptions) -> EvalData:
    if not root.is_dir():
        raise DatasetSpecError(f"--dataset {spec!r}: {root} is not a folder; wds: needs CLIP_benchmark's layout "
                               "(DIR/<split>/nshards.txt and DIR/<split>/0.tar ...)")
    kind = (root / "dataset_type.txt").read_text().strip().lower() if (root / "dataset_type.txt").is_file() else ""
    if kind == "multilabel":
        raise DatasetSpecError(f"--dataset {spec!r}: multilabel datasets are not supported; evaluate a single-label "
                               "classification or a retrieval dataset")
    retrieval = kind == "retrieval"
    test = _wds_split(spec, root, options.split, options, retrieval)
    train = None
    if options.split != "train" and (root / "train" / "nshards.txt").is_file():
        train = _wds_split(spec, root, "train", options, retrieval)
    return EvalData(spec, test, train)


# ------------------------------------------------------------------------------ manifests
def read_manifest_spec(spec: str, path: Path, options: SpecOptions) -> EvalData:
    if not path.is_file():
        raise DatasetSpecError(f"--dataset {spec!r}: {path} is not a file; give a CSV/TSV/JSONL/Parquet manifest")
    stats = ReadStats()
    label_col, image_col = options.label_column, options.image_column
    by_image: dict[str, int] = {}
    refs, keys, raw_labels, captions = [], [], [], []
    checked = False
    try:
        rows = list(manifest_rows(path, stats))
    except ValueError as e:
        raise DatasetSpecError(f"--dataset {spec!r}: {e}") from None
    except (OSError, UnicodeError, ImportError) as e:  # e.g. a file that is not Parquet at all
        raise DatasetSpecError(f"--dataset {spec!r}: cannot read {path} as a {path.suffix} manifest "
                               f"({type(e).__name__}: {e}); check the file and its extension") from None
    for n, row in rows:
        key = f"{path.name}:{n}"
        if row is None:
            stats.skip("bad_row", f"{key}: does not parse")
            continue
        if not checked:
            checked = True
            columns = list(row)
            for col, flag in ((image_col, "--image-column"), (label_col, "--label-column")):
                if col is not None and col not in row:
                    raise DatasetSpecError(f"--dataset {spec!r}: unknown column {col!r} ({flag}); {path.name} has "
                                           f"columns {columns}")
        image = row.get(image_col)
        if not isinstance(image, str) or not image.strip():
            stats.skip("bad_row", f"{key}: no '{image_col}' value")
            continue
        file = Path(image.strip())
        file = file if file.is_absolute() else path.parent / file
        caps: list[str] | None = []
        for c in sorted(c for c in row if c.startswith("caption")):
            got = clean_captions(row.get(c))
            if got is None:
                caps = None
                break
            caps.extend(got)
        if caps is None:
            stats.skip("bad_row", f"{key}: captions are not strings")
            continue
        label = None
        if label_col is not None:
            value = row.get(label_col)
            if (
                value is None
                or (isinstance(value, str) and not value.strip())
                or (isinstance(value, float) and math.isnan(value))
            ):
                stats.skip("bad_row", f"{key}: empty {label_col!r}")
                continue
            label = value.strip() if isinstance(value, str) else value
        elif not caps:
            stats.skip("no_caption", key)
            continue
        where = str(file)
        if where in by_image:  # another row for the same image: more captions
            captions[by_image[where]].extend(caps)
            continue
        if not file.is_file():
            stats.skip("missing_image", f"{key}: {file}")
            continue
        if file.stat().st_size == 0:
            stats.skip("corrupt_image", f"{key}: {file} has zero bytes")
            continue
        by_image[where] = len(refs)
        refs.append(ImageRef(where))
        keys.append(key)
        raw_labels.append(label)
        captions.append(caps)
        stats.read += 1
    if not refs:
        raise DatasetSpecError(f"--dataset {spec!r}: no usable rows in {path} (skipped: {dict(stats.skipped)}, e.g. "
                               f"{next(iter(stats.examples.values()), [''])[0]}); check the '{image_col}' paths "
                               "(relative to the manifest's folder)")
    split = EvalSplit(spec, "test", refs, keys, stats=stats)
    if any(captions):
        split.captions = captions
    if label_col is not None:
        ints = [as_label(v) for v in raw_labels]
        if all(v is not None and v >= 0 for v in ints):
            split.labels = ints
            if options.classnames:
                names = read_lines(options.classnames, "class names")
                if max(ints) >= len(names):
                    raise DatasetSpecError(f"--dataset {spec!r}: {options.classnames} has {len(names)} lines but "
                                           f"{label_col!r} goes up to {max(ints)}; write one name per class index")
                split.classnames = names
        else:  # text labels: the classes are the sorted distinct values (or the --classnames file, in its order)
            values = [str(v) for v in raw_labels]
            names = read_lines(options.classnames, "class names") if options.classnames else sorted(set(values))
            index = {c: i for i, c in enumerate(names)}
            unknown = sorted(set(values) - set(index))
            if unknown:
                raise DatasetSpecError(f"--dataset {spec!r}: labels {unknown[:5]} are not in {options.classnames}; "
                                       "add them to the class names file")
            split.labels, split.classnames = [index[v] for v in values], names
        split.templates = resolve_templates(options.templates)
        if split.captions is not None and not all(captions):
            split.captions = None  # retrieval needs a caption for every image
    return EvalData(spec, split)


# ------------------------------------------------------------------------------ clipforge shard directories
def _shard_split(spec: str, root: Path, manifest: dict, split: str, view: str | None) -> EvalSplit:
    from ..data.shards import shard_entries

    stats = ReadStats()
    refs, keys, labels, captions = [], [], [], []
    for shard in manifest["splits"][split]["shards"]:
        path = root / shard["file"]
        try:
            entries = shard_entries(path)
        except (tarfile.TarError, OSError, EOFError, ValueError, json.JSONDecodeError) as e:
            stats.skip("bad_shard", f"{path}: {type(e).__name__}: {e}")
            continue
        for e in entries:
            if e.size == 0:
                stats.skip("corrupt_image", f"{e.key}: zero bytes")
                continue
            lab = (e.meta.get("labels") or {}).get(view) if view else None
            refs.append(ImageRef(str(path), e.offset, e.size))
            keys.append(e.key)
            labels.append(lab)
            captions.append([c for c in e.meta.get("captions", []) if isinstance(c, str) and c.strip()])
            stats.read += 1
    out = EvalSplit(spec, split, refs, keys, stats=stats)
    if view is not None:
        keep = [i for i, v in enumerate(labels) if v is not None]
        for i in sorted(set(range(len(refs))) - set(keep)):
            stats.skip("bad_row", f"{keys[i]}: no '{view}' label")
            stats.read -= 1
        out.refs, out.keys = [refs[i] for i in keep], [keys[i] for i in keep]
        out.labels, captions = [int(labels[i]) for i in keep], [captions[i] for i in keep]
        spec_view = manifest["label_views"][view]
        out.classnames = list(spec_view["classes"])
        out.templates = [t if "{}" in t else t.replace("{c}", "{}") for t in spec_view.get("templates", [])] or None
    if captions and all(captions):
        out.captions = captions
    if not out.refs:
        raise DatasetSpecError(f"--dataset {spec!r}: split '{split}' of {root} holds no usable samples")
    return out


def read_shards(spec: str, root: Path, options: SpecOptions) -> EvalData:
    from ..data.shards import DataNotBuiltError, read_manifest

    try:
        manifest = read_manifest(root)
    except DataNotBuiltError as e:
        raise DatasetSpecError(f"--dataset {spec!r}: {e}") from None
    splits = manifest["splits"]
    if options.split not in splits:
        raise DatasetSpecError(f"--dataset {spec!r}: split '{options.split}' is not in {root} (it has "
                               f"{sorted(splits)}); choose one with --split")
    views = list(manifest.get("label_views") or {})
    view = options.label_column or (views[0] if views else None)
    if view is not None and view not in views:
        raise DatasetSpecError(f"--dataset {spec!r}: unknown label view {view!r} (--label-column); {root} has "
                               f"{views or 'none'}")
    test = _shard_split(spec, root, manifest, options.split, view)
    if view is not None and test.templates is None:
        test.templates = resolve_templates(options.templates)
    if options.classnames and view is not None:
        test.classnames = read_classnames(options.classnames, expected=len(test.classnames or []))
    train = None
    if options.split != "train" and "train" in splits:
        train = _shard_split(spec, root, manifest, "train", view)
        train.classnames, train.templates = test.classnames, test.templates
    return EvalData(spec, test, train)


def load_train_split(spec: str, options: SpecOptions) -> EvalSplit:
    """The ``--train-dataset`` spec's split ``train`` when it has one, else its ``--split``."""
    from dataclasses import replace

    data = load_eval_data(spec, options)
    if data.train is not None:
        return data.train
    if parse_spec(spec)[0] in ("wds", "shards"):
        try:
            return load_eval_data(spec, replace(options, split="train")).test
        except DatasetSpecError:
            pass
    return data.test


__all__ = [
    "BUILTIN",
    "PREFIXES",
    "DatasetSpecError",
    "EvalData",
    "EvalSplit",
    "ImageRef",
    "SpecOptions",
    "is_builtin",
    "load_eval_data",
    "load_train_split",
    "parse_spec",
]
