"""Hard-negative captions generated from a positive caption, by named type.

The types follow the compositionality benchmarks whose negatives they imitate:

- ``replace_attribute``, ``replace_object``, ``replace_relation``, ``swap_attribute``,
  ``swap_objects``: SugarCrepe (Hsieh et al., 2023, "SugarCrepe: Fixing Hackable Benchmarks
  for Vision-Language Compositionality"), whose REPLACE-att/obj/rel and SWAP-att/obj
  categories change one thing of the caption.
- ``swap_objects`` on a relation caption is ARO's VG-Relation test (Yuksekgonul et al., 2023,
  "When and why vision-language models behave like bags-of-words"): the two noun phrases
  around the relation trade places.
- ``shuffle_words``: ARO's word-order perturbations (COCO/Flickr-Order).
- ``change_count``: counterfactual counts as in "Teaching CLIP to Count to Ten" (Paiss et al., 2023).
- ``negate``: CREPE's negation foils (Ma et al., 2023, "CREPE: Can Vision-Language Foundation
  Models Reason Compositionally?").

Every generator is rule-based over :mod:`clipforge.data.vocabulary` and returns ``None`` when
its type does not apply to the caption. ``avoid`` is a set of words that are true of the image
(by default the words of all its captions): a replacement never uses them, so "a red circle"
in an image that also holds a blue square never becomes "a blue circle".

:func:`negatives_for_item` turns a dataset item into ``{type: [captions]}``, the ``negatives``
format that :class:`clipforge.train.data.TrainItems` and the hard-negative losses read.
"""
from __future__ import annotations

import re
import zlib
from typing import Any, Callable, Iterable

import numpy as np

from .vocabulary import (
    ATTRIBUTES,
    COUNT_VALUES,
    COUNTS,
    DETERMINERS,
    OBJECTS,
    RELATIONS,
    WORD,
    article_for,
    match_case,
    normalize,
    noun_number,
    plural,
)

NEGATIVE_TYPES = ("replace_attribute", "swap_attribute", "replace_object", "swap_objects", "replace_relation",
                  "change_count", "shuffle_words", "negate")

_ATTR_CLASS: dict[str, tuple[str, int]] = {w: (cat, i) for cat, classes in ATTRIBUTES.items()
                                           for i, cls in enumerate(classes) for w in cls}
_OBJ_CAT: dict[str, str] = {}
for _cat, _words in OBJECTS.items():
    for _w in _words:
        _OBJ_CAT.setdefault(_w, _cat)
_RELATION_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, RELATIONS), key=len, reverse=True)) + r")\b",
                          re.IGNORECASE)
_BOUNDARY_WORDS = frozenset({"and", "with", "that", "which", "while", "who", "where", "in", "on", "at", "of"})


class _Tok:
    __slots__ = ("start", "end", "text", "low")

    def __init__(self, m: re.Match):
        self.start, self.end, self.text = m.start(), m.end(), m.group()
        self.low = self.text.lower()


def _tokens(text: str) -> list[_Tok]:
    return [_Tok(m) for m in WORD.finditer(text)]


def _replace(text: str, spans: list[tuple[int, int, str]]) -> str:
    """Replace character spans (non-overlapping) with new strings."""
    out, last = [], 0
    for s, e, new in sorted(spans):
        out += [text[last:s], new]
        last = e
    return "".join(out + [text[last:]])


def _article_fix(text: str, toks: list[_Tok], i: int, new_word: str) -> list[tuple[int, int, str]]:
    """The span that re-agrees the article before token ``i`` when token ``i`` becomes ``new_word``."""
    if i > 0 and toks[i - 1].low in ("a", "an") and text[toks[i - 1].end : toks[i].start] == " ":
        want = article_for(new_word)
        if want != toks[i - 1].low:
            return [(toks[i - 1].start, toks[i - 1].end, match_case(want, toks[i - 1].text))]
    return []


def _is_noun(toks: list[_Tok], i: int) -> bool:
    """Token ``i`` is a known noun used as a noun (not as a modifier of a following noun: "orange circle")."""
    if noun_number(toks[i].low) is None:
        return False
    nxt = toks[i + 1].low if i + 1 < len(toks) else None
    return not (nxt is not None and noun_number(nxt) is not None and toks[i].low in _ATTR_CLASS)


def _is_attribute(toks: list[_Tok], i: int) -> bool:
    if toks[i].low not in _ATTR_CLASS:
        return False
    return not _is_noun(toks, i) or toks[i].low not in _OBJ_CAT


def _avoid_set(avoid: Iterable[str] | None, caption: str) -> set[str]:
    words = {w.lower() for w in WORD.findall(caption)}
    for a in avoid or ():
        words.update(w.lower() for w in WORD.findall(a))
    return words


def _pick(rng: np.random.Generator, options: list) -> Any:
    return options[int(rng.integers(len(options)))]


# ----------------------------------------------------------------- the generators


def replace_attribute(caption: str, rng: np.random.Generator, avoid: Iterable[str] | None = None) -> str | None:
    """One attribute word (color, size, material, ...) becomes one of another meaning class of its
    category that no word in ``avoid`` or the caption belongs to: "a red circle." -> "a green circle."."""
    toks, bad = _tokens(caption), _avoid_set(avoid, caption)
    choices = []
    for i, t in enumerate(toks):
        if not _is_attribute(toks, i):
            continue
        cat, cls = _ATTR_CLASS[t.low]
        classes = ATTRIBUTES[cat]
        options = [c[0] for j, c in enumerate(classes) if j != cls and not bad.intersection(c)]
        if options:
            choices.append((i, options))
    if not choices:
        return None
    i, options = _pick(rng, choices)
    new = match_case(_pick(rng, options), toks[i].text)
    return _replace(caption, [(toks[i].start, toks[i].end, new)] + _article_fix(caption, toks, i, new))


def swap_attribute(caption: str, rng: np.random.Generator, avoid: Iterable[str] | None = None) -> str | None:
    """Two attribute words of the same category with different values, on different objects, trade
    places: "a red circle left of a blue square." -> "a blue circle left of a red square."."""
    toks = _tokens(caption)
    attrs = [i for i in range(len(toks)) if _is_attribute(toks, i)]
    pairs = []
    for a in range(len(attrs)):
        for b in range(a + 1, len(attrs)):
            i, j = attrs[a], attrs[b]
            (ci, ki), (cj, kj) = _ATTR_CLASS[toks[i].low], _ATTR_CLASS[toks[j].low]
            if ci != cj or ki == kj:
                continue
            # on different objects: a noun lies between the two attribute words; and the swap must
            # change what is said, so either the two nouns differ or a relation orders them
            ni = next((k for k in range(i + 1, j) if _is_noun(toks, k)), None)
            nj = next((k for k in range(j + 1, len(toks)) if _is_noun(toks, k)), None)
            if ni is None:
                continue
            ordered = _RELATION_RE.search(caption[toks[ni].end : toks[j].start]) is not None
            if ordered or nj is None or toks[ni].low != toks[nj].low:
                pairs.append((i, j))
    if not pairs:
        return None
    i, j = _pick(rng, pairs)
    wi, wj = match_case(toks[j].low, toks[i].text), match_case(toks[i].low, toks[j].text)
    spans = [(toks[i].start, toks[i].end, wi), (toks[j].start, toks[j].end, wj)]
    return _replace(caption, spans + _article_fix(caption, toks, i, wi) + _article_fix(caption, toks, j, wj))


def replace_object(caption: str, rng: np.random.Generator, avoid: Iterable[str] | None = None) -> str | None:
    """One object noun becomes another of its category (shape -> shape, animal -> animal) that is
    not in ``avoid``, keeping its number: "three red circles." -> "three red stars."."""
    toks, bad = _tokens(caption), _avoid_set(avoid, caption)
    choices = []
    for i, t in enumerate(toks):
        info = noun_number(t.low)
        if info is None or info[0] not in _OBJ_CAT or not _is_noun(toks, i):
            continue
        sg, number = info
        options = [w for w in OBJECTS[_OBJ_CAT[sg]] if w != sg and w not in bad and plural(w) not in bad]
        if options:
            choices.append((i, number, options))
    if not choices:
        return None
    i, number, options = _pick(rng, choices)
    word = _pick(rng, options)
    new = match_case(plural(word) if number == "pl" else word, toks[i].text)
    return _replace(caption, [(toks[i].start, toks[i].end, new)] + _article_fix(caption, toks, i, new))


def _relation(caption: str) -> re.Match | None:
    return _RELATION_RE.search(caption)


def _noun_phrases_around(caption: str, rel: re.Match) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Character spans of the noun phrase before and after a relation phrase."""
    toks = _tokens(caption)
    before = [t for t in toks if t.end <= rel.start()]
    after = [t for t in toks if t.start >= rel.end()]
    if not before or not after:
        return None
    # before: back to the nearest determiner (or just the last word), not past punctuation
    k = len(before) - 1
    start = k
    while k >= 0:
        if before[k].low in DETERMINERS:
            start = k
            break
        if k < len(before) - 1 and re.search(r"[,;:.!?]", caption[before[k].end : before[k + 1].start]):
            break
        k -= 1
    np1 = (before[start].start, before[-1].end)
    if re.search(r"[,;:.!?]", caption[np1[0] : np1[1]]):
        return None
    # after: to punctuation or a clause word
    end = 0
    for k in range(1, len(after)):
        if re.search(r"[,;:.!?]", caption[after[k - 1].end : after[k].start]) or after[k].low in _BOUNDARY_WORDS:
            break
        end = k
    np2 = (after[0].start, after[end].end)
    return np1, np2


def swap_objects(caption: str, rng: np.random.Generator, avoid: Iterable[str] | None = None) -> str | None:
    """The noun phrases on both sides of a spatial relation trade places (ARO VG-Relation):
    "a red circle left of a blue square." -> "a blue square left of a red circle."."""
    rel = _relation(caption)
    if rel is None:
        return None
    spans = _noun_phrases_around(caption, rel)
    if spans is None:
        return None
    (s1, e1), (s2, e2) = spans
    np1, np2 = caption[s1:e1], caption[s2:e2]
    if normalize(np1) == normalize(np2):
        return None
    first = match_case(np2[:1].lower(), np1[:1]) + np2[1:] if np1[:1].isupper() else np2
    second = np1[:1].lower() + np1[1:] if np1[:1].isupper() and not np1.isupper() else np1
    return caption[:s1] + first + caption[e1:s2] + second + caption[e2:]


def replace_relation(caption: str, rng: np.random.Generator, avoid: Iterable[str] | None = None) -> str | None:
    """The spatial relation becomes its converse ("left of" -> "right of"), so the negative is false
    whatever else holds in the image (another relation, e.g. "above" for "left of", may be true)."""
    rel = _relation(caption)
    if rel is None:
        return None
    new = RELATIONS[rel.group().lower()]
    return caption[: rel.start()] + match_case(new, rel.group()) + caption[rel.end():]


def change_count(caption: str, rng: np.random.Generator, avoid: Iterable[str] | None = None) -> str | None:
    """The number changes to another (not in ``avoid``), with the noun's plural and "is"/"are"
    agreeing: "there is one red circle." -> "there are three red circles."."""
    toks, bad = _tokens(caption), _avoid_set(avoid, caption)
    choices = []
    for i, t in enumerate(toks):
        if t.low not in COUNT_VALUES:
            continue
        # the counted noun: the first known noun within four words
        noun = next((k for k in range(i + 1, min(i + 5, len(toks))) if _is_noun(toks, k)), None)
        if noun is None:
            continue
        digits = t.low.isdigit()
        options = [str(v) if digits else COUNTS[v - 1] for v in range(1, 11)
                   if v != COUNT_VALUES[t.low] and COUNTS[v - 1] not in bad and str(v) not in bad]
        if options:
            choices.append((i, noun, options))
    if not choices:
        return None
    i, k, options = _pick(rng, choices)
    new = match_case(_pick(rng, options), toks[i].text)
    many = COUNT_VALUES[new.lower()] > 1
    sg, number = noun_number(toks[k].low)
    spans = [(toks[i].start, toks[i].end, new)]
    if (number == "pl") != many:
        spans.append((toks[k].start, toks[k].end, match_case(plural(sg) if many else sg, toks[k].text)))
    for v in (i - 1, k + 1):  # "there is one ..." / "... circles are ..."
        if 0 <= v < len(toks) and toks[v].low in ("is", "are"):
            spans.append((toks[v].start, toks[v].end, match_case("are" if many else "is", toks[v].text)))
    return _replace(caption, spans)


def shuffle_words(caption: str, rng: np.random.Generator, avoid: Iterable[str] | None = None) -> str | None:
    """The same words in another order (ARO's order perturbation); final punctuation stays."""
    body = caption.rstrip()
    end = ""
    while body and body[-1] in ".!?":
        end, body = body[-1] + end, body[:-1]
    words = body.split()
    if len(words) < 3 or len(set(w.lower() for w in words)) < 2:
        return None
    for _ in range(20):
        perm = [words[int(j)] for j in rng.permutation(len(words))]
        if [w.lower() for w in perm] != [w.lower() for w in words]:
            return " ".join(perm) + end
    return None


_FRAMES = re.compile(r"^(a|an) (picture|photo|image|illustration|drawing) (of|showing) ", re.IGNORECASE)
_NEGATED = re.compile(r"\b(no|not|without|never|none|nothing)\b|n't\b", re.IGNORECASE)


def negate(caption: str, rng: np.random.Generator, avoid: Iterable[str] | None = None) -> str | None:
    """CREPE-style negation: "a red circle." -> "there is no red circle."; "three red circles." ->
    "there are no red circles."; "there is a dog." -> "there is no dog.". None for captions that are
    already negated or are lists ("toy, entertainment, rubik")."""
    text = caption.strip()
    if not text or _NEGATED.search(text) or "," in text:
        return None
    toks = _tokens(text)
    if not toks:
        return None
    frame = _FRAMES.match(text)
    if frame:
        text = text[frame.end():]
        toks = _tokens(text)
        if not toks:
            return None
    cap = text[:1].isupper()
    low = toks[0].low
    if low == "there" and len(toks) > 2 and toks[1].low in ("is", "are"):
        verb = toks[1].low
        rest = text[toks[2].start:]
        first = toks[2].low
        if first in ("a", "an", "one", "1") or first in COUNT_VALUES:
            rest = text[toks[3].start:] if len(toks) > 3 else ""
            if not rest:
                return None
        out = f"there {verb} no {rest}"
    elif low in ("a", "an", "one", "the") and len(toks) > 1:
        out = "there is no " + text[toks[1].start:]
    elif low in COUNT_VALUES and len(toks) > 1:
        out = "there are no " + text[toks[1].start:]
    elif not frame and noun_number(toks[-1].low) is not None and len(toks) <= 4:
        number = noun_number(toks[-1].low)[1]
        out = ("there are no " if number == "pl" else "there is no ") + text
    else:
        return None
    return match_case(out[:1], "A" if cap else "a") + out[1:]


GENERATORS: dict[str, Callable[..., str | None]] = {
    "replace_attribute": replace_attribute, "swap_attribute": swap_attribute, "replace_object": replace_object,
    "swap_objects": swap_objects, "replace_relation": replace_relation, "change_count": change_count,
    "shuffle_words": shuffle_words, "negate": negate,
}


def generate(caption: str, kind: str, rng: np.random.Generator | int = 0,
             avoid: Iterable[str] | None = None) -> str | None:
    """One negative of type ``kind`` for ``caption`` (``rng`` a Generator or a seed), or None."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown negative type '{kind}'; choose one of {NEGATIVE_TYPES}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng([int(rng), zlib.crc32(caption.encode())])
    return GENERATORS[kind](caption, rng, avoid)


def negatives_for_captions(captions: list[str], types: Iterable[str] | None = None, per_type: int = 1,
                           seed: int = 0, source: str = "first",
                           avoid: Iterable[str] | None = None) -> dict[str, list[str]]:
    """``{type: [negatives]}`` for one sample with true ``captions``.

    Negatives are written from ``captions[0]`` (``source="first"``, the caption
    ``TrainItems(caption_policy="first")`` pairs them with) or from every caption
    (``source="all"``). The words of all true captions (and ``avoid``) are never introduced,
    no negative equals a true caption (compared on lower-case words), and types that do not
    apply are left out. Deterministic given ``seed`` and the captions.
    """
    if source not in ("first", "all"):
        raise ValueError(f"source must be 'first' or 'all', got '{source}'")
    types = list(NEGATIVE_TYPES if types is None else types)
    for t in types:
        if t not in GENERATORS:
            raise ValueError(f"unknown negative type '{t}'; choose one of {NEGATIVE_TYPES}")
    captions = [c for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        return {}
    true = {normalize(c) for c in captions}
    bad = list(captions) + list(avoid or ())
    sources = captions[:1] if source == "first" else captions
    out: dict[str, list[str]] = {}
    for t in types:
        rng = np.random.default_rng([seed, zlib.crc32(t.encode()), zlib.crc32("\n".join(captions).encode())])
        found: list[str] = []
        seen = set(true)
        for attempt in range(4 * per_type):
            cap = sources[attempt % len(sources)]
            neg = GENERATORS[t](cap, rng, bad)
            if neg is None:
                if len(sources) == 1:
                    break  # deterministic "does not apply"
                continue
            key = normalize(neg)
            if key not in seen:
                seen.add(key)
                found.append(neg)
                if len(found) == per_type:
                    break
        if found:
            out[t] = found
    return out


def negatives_for_item(item: dict[str, Any], types: Iterable[str] | None = None, per_type: int = 1, seed: int = 0,
                       source: str = "first", merge: bool = False) -> dict[str, list[str]]:
    """Typed negatives of a dataset item (``captions`` and, if present, ``objects`` of a shapes
    sample, whose colors and shapes are added to the words to avoid). ``merge=True`` also keeps
    the item's existing ``negatives`` (generated types appended after them)."""
    captions = item.get("captions") or []
    if isinstance(captions, str):
        captions = [captions]
    avoid = []
    for obj in item.get("objects") or ():
        get = obj.get if isinstance(obj, dict) else (lambda k, o=obj: getattr(o, k, None))
        avoid += [v for v in (get("color"), get("shape"), get("size")) if v]
    made = negatives_for_captions(list(captions), types, per_type, seed, source, avoid)
    if not merge:
        return made
    out = {k: list(v) for k, v in (item.get("negatives") or {}).items()}
    for k, v in made.items():
        out[k] = out.get(k, []) + [c for c in v if c not in out.get(k, [])]
    return out


def with_negatives(dataset, **kwargs) -> NegativesDataset:
    """``dataset`` whose items carry generated typed ``negatives`` (see :func:`negatives_for_item`)."""
    return NegativesDataset(dataset, **kwargs)


class NegativesDataset:
    """Wraps a map-style dataset; ``ds[i]["negatives"]`` = generated negatives (a function of ``seed``
    and the item's captions, so the same every epoch), merged with the item's own unless ``merge=False``."""

    def __init__(self, dataset, types: Iterable[str] | None = None, per_type: int = 1, seed: int = 0,
                 source: str = "first", merge: bool = True):
        self.dataset, self.types, self.per_type = dataset, types, per_type
        self.seed, self.source, self.merge = seed, source, merge

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        item["negatives"] = negatives_for_item(item, self.types, self.per_type, self.seed, self.source, self.merge)
        return item

    def __getattr__(self, name):  # label_views, classnames, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
