"""Caption rewrites, computed once and stored next to the data (LaCLIP).

LaCLIP (Fan et al., 2023, "Improving CLIP Training with Language Rewrites") rewrites every
caption k times with an LLM by in-context learning (``caption => rewrite`` pairs) *before*
training, and at each step draws uniformly from the original caption and its rewrites. This
module holds the text side of that:

- :class:`RewriteProvider`: anything with ``rewrite(captions, n, seed) -> list[list[str]]``.
- :class:`RuleRewriter`: an offline provider (template paraphrases and synonym swaps from a
  small hand-written table); deterministic given the seed and the caption.
- :class:`LMRewriter`: wraps any user callable (a ``transformers`` text-generation pipeline, an
  API client) with a LaCLIP-style prompt, in batches.
- :func:`store_rewrites` / :func:`load_rewrites`: a sidecar file (Parquet or JSON lines) keyed
  by sample index and key, with the provider's name and seed in its metadata. A sidecar that
  does not match the dataset any more (length, keys or captions) is refused with the fix.
  :class:`clipforge.data.captions.SourcedCaptions` exposes stored rewrites as the
  ``rewrites`` caption source; nothing is recomputed per epoch.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from .captions import caption_records
from .vocabulary import ATTRIBUTES, DETERMINERS, OBJECTS, article_for, match_case, normalize

FORMAT = "clipforge-rewrites-1"


@runtime_checkable
class RewriteProvider(Protocol):
    """Rewrites captions: ``rewrite(captions, n, seed)[i]`` = up to ``n`` rewrites of ``captions[i]``
    (none that equal the input). ``name`` (optional) is stored in sidecar metadata."""

    def rewrite(self, captions: list[str], n: int, seed: int) -> list[list[str]]: ...


def provider_name(provider: Any) -> str:
    return str(getattr(provider, "name", None) or type(provider).__name__)


class RewriteError(RuntimeError):
    """A provider failed or answered in a shape that does not fit its input."""


class StaleRewritesError(ValueError):
    """A stored sidecar does not belong to this dataset (or to this provider/seed)."""


# ----------------------------------------------------------------- rule-based provider

# meaning-preserving substitutions (phrases allowed); hand-written for this project
SYNONYMS: dict[str, tuple[str, ...]] = {
    "picture": ("image", "photo", "illustration"), "image": ("picture", "photo"), "photo": ("picture", "image"),
    "illustration": ("drawing", "picture"), "drawing": ("sketch", "illustration"), "sketch": ("drawing",),
    "icon": ("symbol", "pictogram"), "symbol": ("icon", "sign"), "clipart": ("clip art", "illustration"),
    "big": ("large",), "large": ("big",), "small": ("little",), "little": ("small",), "tiny": ("very small",),
    "huge": ("very large",), "colored": ("coloured", "painted"), "colorful": ("multicolored", "colourful"),
    "gray": ("grey",), "grey": ("gray",),
    "left of": ("to the left of",), "right of": ("to the right of",), "to the left of": ("left of",),
    "to the right of": ("right of",), "above": ("over",), "below": ("beneath", "under"), "under": ("beneath",),
    "beneath": ("below",), "next to": ("beside",), "beside": ("next to",), "near": ("close to",),
    "on top of": ("atop",),
    "car": ("automobile",), "automobile": ("car",), "house": ("home",), "mug": ("cup",), "kid": ("child",),
    "child": ("kid",), "man": ("guy",), "woman": ("lady",), "people": ("persons",), "person": ("individual",),
    "dog": ("puppy",), "cat": ("kitty",), "airplane": ("plane", "aircraft"), "plane": ("airplane",),
    "bicycle": ("bike",), "bike": ("bicycle",), "phone": ("telephone",), "telephone": ("phone",),
    "happy": ("joyful", "cheerful"), "sad": ("unhappy",), "smiling": ("grinning",), "face": ("expression",),
    "holding": ("carrying",), "running": ("jogging",), "showing": ("depicting",), "shows": ("depicts",),
    "with": ("having",), "road": ("street",), "street": ("road",), "flag": ("banner",), "button": ("key",),
    "stone": ("rock",), "rock": ("stone",), "building": ("structure",), "hat": ("cap",), "sign": ("signboard",),
    "beautiful": ("pretty",), "pretty": ("beautiful",), "old": ("aged",), "shape": ("figure",),
    "shapes": ("figures",), "circle": ("round disc",), "square": ("square shape",), "objects": ("things",),
    "things": ("objects",),
}
_SYN_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, SYNONYMS), key=len, reverse=True)) + r")\b",
                     re.IGNORECASE)
FRAMES = ("a picture of {}", "an image of {}", "a photo of {}", "an illustration of {}", "a drawing of {}",
          "{}, in a picture", "a picture showing {}", "an image that shows {}")
_PREFIX = re.compile(r"^(a|an) (picture|photo|image|illustration|drawing) (of|showing|that shows) |"
                     r"^(this is|here is|here are|there is|there are) ", re.IGNORECASE)
_COLORS = {w for cls in ATTRIBUTES["color"] for w in cls}
_SIZES = {w for cls in ATTRIBUTES["size"] for w in cls}
_NOUNS = {w for ws in OBJECTS.values() for w in ws}
# "a [size] COLOR NOUN" -> "a [size] NOUN in COLOR" and back ("a circle colored red")
_ADJ_NOUN = re.compile(r"^(a|an|one|the) (?:(\w+) )?(\w+) (\w+)$", re.IGNORECASE)
_COLORED = re.compile(r"^(a|an|the) (\w+) (?:colored|coloured|in) (\w+)$", re.IGNORECASE)
_ASCII_WORD = re.compile(r"[A-Za-z]{2,}")
_COMMON = DETERMINERS | _COLORS | _SIZES | _NOUNS | {w for cls in ATTRIBUTES.values() for c in cls for w in c} \
    | {"there", "this", "here"}


def _split_end(text: str) -> tuple[str, str]:
    body = text.strip()
    end = ""
    while body and body[-1] in ".!?":
        end, body = body[-1] + end, body[:-1]
    return body.strip(), end


def _fix_articles(text: str) -> str:
    return re.sub(r"\b([Aa]n?) (\w+)", lambda m: match_case(article_for(m.group(2)), m.group(1)) + " " + m.group(2),
                  text)


class RuleRewriter:
    """Offline paraphrases: a caption's framing is replaced ("a picture of X" -> "an image that shows
    X"), attribute order is restated ("a red circle" <-> "a circle in red"), one or two words or
    phrases are swapped for synonyms (:data:`SYNONYMS`), keyword lists are reordered. Candidates
    equal to the input (on lower-case words) are dropped, so a rewrite always differs when any
    change is possible. Only captions with Latin letters are rewritten (the table is English);
    others get ``[]``. Deterministic: a function of ``(seed, caption)`` alone, so batching and
    order do not matter.
    """

    name = "rule"

    def __init__(self, max_synonym_swaps: int = 2):
        self.max_synonym_swaps = max_synonym_swaps

    def candidates(self, caption: str) -> list[str]:
        """Every rewrite this rewriter can make of ``caption`` (deduplicated, none equal to it)."""
        if not _ASCII_WORD.search(caption) or not caption.isascii():
            return []
        body, end = _split_end(caption)
        if not body:
            return []
        m = _PREFIX.match(body)
        core = body[m.end():] if m else body
        words = core.split()
        if 1 <= len(words) <= 2 and core.islower() and words[0] not in DETERMINERS \
                and words[-1] in _NOUNS:  # a bare noun: "coffee mug" -> "a coffee mug"
            core = f"{article_for(words[0])} {core}"
        cores = [core] + self._restate(core) + self._synonyms(core)
        cores += [s for c in self._restate(core) for s in self._synonyms(c)]
        out: list[str] = []
        if "," in core and len(core.split(",")) >= 3 and not re.search(r"\b(a|an|the)\b", core, re.I):
            parts = [p.strip() for p in core.split(",")]  # keyword list: reorder
            out += [", ".join(parts[1:] + parts[:1]), ", ".join(reversed(parts))]
            cores = [core]
        for c in cores:
            out.append(c + end)
            first = c.split()[0].lower() if c.split() else ""
            # inside a frame, a leading common word loses its capital; a name ("Rubik's Cube") keeps it
            inner = c[:1].lower() + c[1:] if first in _COMMON else c
            out += [frame.format(inner) + end for frame in FRAMES]
        seen, keep = {normalize(caption)}, []
        for o in out:
            o = _fix_articles(o)
            if caption[:1].isupper():
                o = o[:1].upper() + o[1:]
            k = normalize(o)
            if k and k not in seen:
                seen.add(k)
                keep.append(o)
        return keep

    def _restate(self, core: str) -> list[str]:
        m = _COLORED.match(core)
        if m and m.group(2).lower() in _NOUNS and m.group(3).lower() in _COLORS:
            return [f"{m.group(1)} {m.group(3)} {m.group(2)}"]
        m = _ADJ_NOUN.match(core)
        if m:
            det, size, color, noun = m.groups()
            if color.lower() in _COLORS and (size is None or size.lower() in _SIZES) and noun.lower() in _NOUNS:
                return [f"{det} {size + ' ' if size else ''}{noun} in {color}"]
        return []

    def _synonyms(self, core: str) -> list[str]:
        hits = list(_SYN_RE.finditer(core))
        out = []
        for h in hits:
            for alt in SYNONYMS[h.group().lower()]:
                out.append(core[: h.start()] + match_case(alt, h.group()) + core[h.end():])
        if self.max_synonym_swaps >= 2 and len(hits) >= 2:  # first alternative for the first two hits
            a, b = hits[0], hits[1]
            out.append(core[: a.start()] + match_case(SYNONYMS[a.group().lower()][0], a.group())
                       + core[a.end(): b.start()] + match_case(SYNONYMS[b.group().lower()][0], b.group())
                       + core[b.end():])
        return out

    def rewrite(self, captions: list[str], n: int, seed: int) -> list[list[str]]:
        out = []
        for c in captions:
            cands = self.candidates(c)
            rng = np.random.default_rng([int(seed), zlib.crc32(c.encode("utf-8"))])
            pick = rng.permutation(len(cands))[:n] if cands else []
            out.append([cands[int(i)] for i in pick])
        return out


# ----------------------------------------------------------------- language-model hook

# hand-written caption => rewrite pairs in LaCLIP's in-context format
LACLIP_EXAMPLES = (
    ("a dog running on the beach", "A brown dog runs along the sandy shore."),
    ("three red apples on a table", "Three red apples are lying on a wooden table."),
    ("bus, city, street", "A city bus driving down a street."),
)
LACLIP_INSTRUCTION = ("Rewrite each image caption in a different way. Keep every object, attribute, count and "
                      "relation; add nothing that is not in the caption.")


def laclip_prompt(caption: str, examples: Sequence[tuple[str, str]] = LACLIP_EXAMPLES,
                  instruction: str = LACLIP_INSTRUCTION) -> str:
    """``instruction`` + ``source => target`` example lines + ``caption =>`` (LaCLIP's ICL format)."""
    lines = [instruction] if instruction else []
    lines += [f"{a} => {b}" for a, b in examples]
    lines.append(f"{caption} =>")
    return "\n".join(lines)


def _generated_text(out: Any) -> str:
    """The text of one generation: a string, ``{"generated_text": ...}`` or a list of those (first)."""
    if isinstance(out, list):
        if not out:
            return ""
        out = out[0]
    if isinstance(out, dict):
        out = out.get("generated_text", "")
    if not isinstance(out, str):
        raise TypeError(f"expected a string or {{'generated_text': str}}, got {type(out).__name__}")
    return out


@dataclass
class LMRewriter:
    """Rewrites with any callable ``generate(prompts: list[str]) -> list`` (one output per prompt: a
    string, ``{"generated_text": str}``, or a list of those, as a ``transformers`` text-generation
    pipeline returns). Each caption is asked ``n`` times with :func:`laclip_prompt`, ``batch_size``
    prompts per call; the answer's first line after the prompt is the rewrite. ``set_seed`` (e.g.
    ``transformers.set_seed``) is called with ``seed`` before each batch (plus the batch number)
    so sampling generations are reproducible.

    Example::

        from transformers import pipeline
        gen = pipeline("text-generation", model="...")
        lm = LMRewriter(lambda p: gen(p, max_new_tokens=40, do_sample=True), name="my-llm",
                        set_seed=transformers.set_seed)
    """

    generate: Callable[[list[str]], list]
    name: str = "lm"
    batch_size: int = 16
    prompt: Callable[[str], str] = laclip_prompt
    set_seed: Callable[[int], Any] | None = None

    def rewrite(self, captions: list[str], n: int, seed: int) -> list[list[str]]:
        jobs = [(i, self.prompt(c)) for i, c in enumerate(captions) for _ in range(n)]
        results: list[list[str]] = [[] for _ in captions]
        for b in range(0, len(jobs), self.batch_size):
            chunk = jobs[b : b + self.batch_size]
            if self.set_seed is not None:
                self.set_seed(int(seed) + b // self.batch_size)
            lo, hi = chunk[0][0], chunk[-1][0]
            where = (
                f"LMRewriter '{self.name}': batch {b // self.batch_size} (captions {lo}..{hi}, first: {captions[lo]!r})"
            )
            try:
                outs = self.generate([p for _, p in chunk])
            except Exception as e:  # the user's callable: report where, keep the cause
                raise RewriteError(f"{where}: the generate callable raised {type(e).__name__}: {e}") from e
            if not isinstance(outs, (list, tuple)) or len(outs) != len(chunk):
                got = len(outs) if isinstance(outs, (list, tuple)) else type(outs).__name__
                raise RewriteError(f"{where}: the generate callable returned {got} outputs for {len(chunk)} prompts; "
                                   "it must return one output per prompt")
            for (i, p), out in zip(chunk, outs):
                try:
                    text = _generated_text(out)
                except TypeError as e:
                    raise RewriteError(f"{where}: {e}") from None
                if text.startswith(p):  # pipelines return the prompt too unless return_full_text=False
                    text = text[len(p):]
                text = text.strip().split("\n", 1)[0].strip()
                if text and normalize(text) != normalize(captions[i]) and text not in results[i]:
                    results[i].append(text)
        return results


# ----------------------------------------------------------------- sidecar files


@dataclass
class Rewrites:
    """Rewrites read from a sidecar: ``rewrites[i][j]`` = the rewrites of caption ``j`` of sample ``i``."""

    keys: list[str]
    captions: list[list[str]]
    rewrites: list[list[list[str]]]
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def for_index(self, index: int) -> list[list[str]]:
        return self.rewrites[index]

    def flat(self, index: int) -> list[str]:
        """All rewrites of sample ``index`` in one list (the ``rewrites`` caption source)."""
        return [r for per in self.rewrites[index] for r in per]

    def for_key(self, key: str) -> list[list[str]]:
        if not hasattr(self, "_by_key"):
            self._by_key = {k: i for i, k in enumerate(self.keys)}
        return self.rewrites[self._by_key[key]]

    def check(self, dataset_or_records, what: str = "dataset") -> None:
        """Raise :class:`StaleRewritesError` unless the sidecar was made from exactly these samples."""
        records = dataset_or_records if _is_records(dataset_or_records) else caption_records(dataset_or_records)
        _check_records(self, records, what)


def _is_records(x) -> bool:
    return isinstance(x, list) and (not x or (isinstance(x[0], dict) and "key" in x[0] and "image" not in x[0]))


def _keys_digest(keys: Iterable[str]) -> str:
    h = hashlib.sha1()
    for k in keys:
        h.update(k.encode("utf-8") + b"\0")
    return h.hexdigest()


def _check_records(rw: Rewrites, records: list[dict[str, Any]], what: str) -> None:
    fix = (f"rerun store_rewrites(..., overwrite=True) to recompute it, or delete {rw.path or 'the sidecar'}")
    where = f"rewrites sidecar {rw.path or ''}".rstrip()
    if len(records) != len(rw.keys):
        raise StaleRewritesError(
            f"{where} is stale: it has {len(rw.keys)} samples, the {what} has {len(records)}; {fix}"
        )
    for i, (rec, key) in enumerate(zip(records, rw.keys)):
        if str(rec["key"]) != key:
            raise StaleRewritesError(f"{where} is stale: sample {i} has key '{rec['key']}' in the {what} but "
                                     f"'{key}' in the sidecar; {fix}")
    for i, (rec, caps) in enumerate(zip(records, rw.captions)):
        if list(rec["captions"]) != list(caps):
            raise StaleRewritesError(f"{where} is stale: the captions of sample {i} (key '{rw.keys[i]}') changed "
                                     f"since it was written; {fix}")


def sidecar_path(dataset, provider: Any, suffix: str = "parquet") -> Path:
    """Where rewrites of a shard-directory dataset go by default: ``ROOT/SPLIT.rewrites.NAME.parquet``."""
    root, split = getattr(dataset, "root", None), getattr(dataset, "split", None)
    if root is None or split is None:
        raise ValueError("sidecar_path needs a shard-directory dataset (with .root and .split); pass a path instead")
    return Path(root) / f"{split}.rewrites.{provider_name(provider)}.{suffix}"


def _select(record: dict[str, Any], languages: set[str] | None) -> list[bool]:
    """Which captions of a record to rewrite: all, or those tagged with one of ``languages``."""
    langs = record.get("caption_langs")
    if languages is None or not langs:
        return [True] * len(record["captions"])
    return [lang in languages for lang in langs]


def store_rewrites(dataset_or_items, provider: RewriteProvider, path: str | os.PathLike | None = None, n: int = 1,
                   seed: int = 0, languages: Sequence[str] | None = None, overwrite: bool = False,
                   batch_size: int = 512, progress: Callable[[int], None] | None = None) -> Rewrites:
    """Rewrite every caption of a dataset ``n`` times ONCE and store the result at ``path``
    (``.parquet`` or ``.jsonl``; default :func:`sidecar_path` for shard directories).

    If a sidecar for the same samples, provider, seed, ``n`` and languages is already there it is
    read, not recomputed; one for other samples or settings raises :class:`StaleRewritesError`
    unless ``overwrite``. ``languages`` limits rewriting to captions tagged with those languages
    (``caption_langs``, e.g. the emoji corpus); the others get no rewrite.
    """
    if not isinstance(provider, RewriteProvider):
        raise TypeError(f"provider {provider!r} has no rewrite(captions, n, seed) method")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    path = Path(path) if path is not None else sidecar_path(dataset_or_items, provider)
    records = caption_records(dataset_or_items)
    langs = sorted(languages) if languages is not None else None
    settings = {"provider": provider_name(provider), "seed": int(seed), "n": int(n), "languages": langs}
    if path.exists() and not overwrite:
        old = load_rewrites(path)
        diff = {k: (old.meta.get(k), v) for k, v in settings.items() if old.meta.get(k) != v}
        if diff:
            raise StaleRewritesError(f"rewrites sidecar {path} was written with other settings "
                                     f"({', '.join(f'{k}: {a!r} there, {b!r} asked' for k, (a, b) in diff.items())}); "
                                     f"pass overwrite=True to recompute it or choose another path")
        old.check(records)
        return old
    want = set(langs) if langs is not None else None
    flat = [
        (i, j, c)
        for i, rec in enumerate(records)
        for j, (c, ok) in enumerate(zip(rec["captions"], _select(rec, want)))
        if ok
    ]
    per_sample: list[list[list[str]]] = [[[] for _ in rec["captions"]] for rec in records]
    for b in range(0, len(flat), batch_size):
        chunk = flat[b : b + batch_size]
        out = provider.rewrite([c for _, _, c in chunk], n, seed)
        if len(out) != len(chunk):
            raise RewriteError(
                f"provider '{provider_name(provider)}' returned {len(out)} results for {len(chunk)} captions"
            )
        for (i, j, _), rws in zip(chunk, out):
            per_sample[i][j] = [str(r) for r in rws][:n]
        if progress is not None:
            progress(len(chunk))
    rewritten = sum(1 for per in per_sample for r in per if r)
    meta = {"format": FORMAT, **settings, "length": len(records), "keys_sha1": _keys_digest(r["key"] for r in records),
            "captions": len(flat), "captions_rewritten": rewritten,
            "rewrites": sum(len(r) for per in per_sample for r in per)}
    rw = Rewrites([str(r["key"]) for r in records], [list(r["captions"]) for r in records], per_sample, meta, str(path))
    _write(rw, path)
    return rw


def _write(rw: Rewrites, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"index": pa.array(range(len(rw.keys)), pa.int64()), "key": pa.array(rw.keys, pa.string()),
                          "captions": pa.array(rw.captions, pa.list_(pa.string())),
                          "rewrites": pa.array(rw.rewrites, pa.list_(pa.list_(pa.string())))})
        table = table.replace_schema_metadata({"clipforge": json.dumps(rw.meta)})
        pq.write_table(table, tmp)
    elif path.suffix == ".jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"meta": rw.meta}, ensure_ascii=False) + "\n")
            for i, (k, c, r) in enumerate(zip(rw.keys, rw.captions, rw.rewrites)):
                f.write(json.dumps({"index": i, "key": k, "captions": c, "rewrites": r}, ensure_ascii=False) + "\n")
    else:
        raise ValueError(f"rewrites sidecar {path}: use a .parquet or .jsonl suffix")
    os.replace(tmp, path)


def load_rewrites(path: str | os.PathLike, dataset=None) -> Rewrites:
    """Read a sidecar written by :func:`store_rewrites`; with ``dataset``, also check that it is not stale."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no rewrites sidecar at {path}: compute it once with store_rewrites(dataset, provider, '{path}')"
        )
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(b"clipforge")
        if raw is None:
            raise ValueError(f"{path} is not a clipforge rewrites sidecar (no 'clipforge' metadata)")
        meta = json.loads(raw)
        cols = table.to_pydict()
        if cols["index"] != list(range(len(cols["index"]))):
            raise ValueError(f"{path}: rows are not in sample order 0..{len(cols['index']) - 1}")
        rw = Rewrites(cols["key"], cols["captions"], cols["rewrites"], meta, str(path))
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            head = json.loads(f.readline())
            rows = [json.loads(line) for line in f if line.strip()]
        if "meta" not in head:
            raise ValueError(f"{path} is not a clipforge rewrites sidecar (first line has no 'meta')")
        rw = Rewrites([r["key"] for r in rows], [r["captions"] for r in rows], [r["rewrites"] for r in rows],
                      head["meta"], str(path))
    else:
        raise ValueError(f"rewrites sidecar {path}: use a .parquet or .jsonl suffix")
    if rw.meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown sidecar format {rw.meta.get('format')!r} (expected {FORMAT})")
    if rw.meta.get("length") != len(rw.keys):
        raise ValueError(f"{path}: metadata says {rw.meta.get('length')} samples, the file has {len(rw.keys)}")
    if dataset is not None:
        rw.check(dataset)
    return rw
