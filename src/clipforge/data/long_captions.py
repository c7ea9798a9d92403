"""Long captions: sentence splitting, sub-caption sampling and caption-length statistics.

- DreamLIP (Zheng et al., 2024, "DreamLIP: Language-Image Pre-training with Long Captions")
  splits a long synthetic caption into sentences and samples k of them per image as
  sub-captions, each a positive for the image -> :func:`split_sentences`, :func:`sample_subcaptions`.
- Long-CLIP (Zhang et al., 2024, "Long-CLIP: Unlocking the Long-Text Capability of CLIP")
  trains on the full long caption and on a short summary of it; the first sentence serves as
  that summary here -> :func:`short_and_long`. Its motivation is the 77-token context of CLIP's
  text tower: :func:`length_stats` reports how many captions exceed it.
"""
from __future__ import annotations

import re
import zlib
from typing import Any, Iterable, Sequence

import numpy as np

# lower-case abbreviations (without their final period) after which a period ends no sentence
ABBREVIATIONS = frozenset({
    "e.g", "i.e", "etc", "vs", "cf", "al", "approx", "ca", "dr", "mr", "mrs", "ms", "prof", "st", "jr", "sr", "no",
    "fig", "figs", "vol", "pp", "ed", "inc", "ltd", "co", "corp", "dept", "est", "mt", "ft", "lt", "sgt", "gen",
    "capt", "col", "rev", "hon", "u.s", "u.k", "a.m", "p.m", "ph.d", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
    "sep", "sept", "oct", "nov", "dec", "min", "max", "incl", "resp", "esp",
})
# abbreviations that often end a sentence: a period after them ends one when a capital follows
_SENTENCE_FINAL_ABBREVIATIONS = frozenset({"etc", "al", "inc", "ltd", "co", "corp", "a.m", "p.m", "u.s", "u.k"})
_CANDIDATE = re.compile(r"[.!?]+[\"')\]]*(?=\s+|$)|\n\s*\n|\n")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, stripped, non-empty.

    A sentence ends at ``.``, ``!`` or ``?`` (with closing quotes/brackets) followed by
    whitespace or the end, and at line breaks. A period does not end a sentence after a known
    abbreviation ("e.g.", "Dr.", "etc." before a lower-case word), after a single-letter initial
    ("J. Smith"), or inside a number ("3.5", where no whitespace follows the period anyway).
    """
    if not text or not text.strip():
        return []
    out, start = [], 0
    for m in _CANDIDATE.finditer(text):
        end = m.end()
        if m.group().startswith("\n"):
            piece = text[start : m.start()].strip()
            if piece:
                out.append(piece)
            start = end
            continue
        before = text[start : m.start()]
        if m.group().startswith(".") and not m.group().startswith(".."):
            word = re.search(r"([A-Za-z][A-Za-z.]*)$", before)
            w = word.group(1).lower() if word else ""
            nxt = re.match(r"\s*(\S)", text[end:])
            next_upper = bool(nxt and (nxt.group(1).isupper() or nxt.group(1) in "\"'(["))
            if w and (w in ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.)*[a-z]", w) and len(w) <= 3
                      and not (w in ("a", "i") and next_upper)):
                # "e.g. the", "Dr. Smith", "J. Smith": no boundary, unless a sentence-final
                # abbreviation ("etc.") is followed by a capital
                if not (w in _SENTENCE_FINAL_ABBREVIATIONS and next_upper):
                    continue
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def sample_subcaptions(caption: str, k: int, rng: np.random.Generator | int = 0, max_sentences: int = 1,
                       replace: bool = False) -> list[str]:
    """``k`` sub-captions of a long caption (DreamLIP): each is a run of 1..``max_sentences``
    consecutive sentences. Distinct spans are drawn without replacement (fewer than ``k`` come
    back when the caption has fewer spans) unless ``replace``. ``rng`` is a Generator or a seed
    (then the draw is a function of the seed and the caption)."""
    if k < 0 or max_sentences < 1:
        raise ValueError(f"k must be >= 0 and max_sentences >= 1, got k={k}, max_sentences={max_sentences}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng([int(rng), zlib.crc32(caption.encode("utf-8"))])
    sents = split_sentences(caption)
    spans = [(i, j) for i in range(len(sents)) for j in range(i + 1, min(i + max_sentences, len(sents)) + 1)]
    if not spans or k == 0:
        return []
    if replace:
        pick = rng.integers(len(spans), size=k)
    else:
        pick = rng.permutation(len(spans))[:k]
    return [" ".join(sents[spans[int(p)][0] : spans[int(p)][1]]) for p in pick]


def subcaptions_at(caption: str, k: int, seed: int, epoch: int, index: int, **kw) -> list[str]:
    """The sub-captions of sample ``index`` at ``epoch``: a pure function of ``(seed, epoch, index)``."""
    return sample_subcaptions(caption, k, np.random.default_rng([seed, epoch, index, 11]), **kw)


def short_and_long(caption: str) -> tuple[str, str]:
    """``(short, long)`` for Long-CLIP-style training: the first sentence and the whole caption."""
    sents = split_sentences(caption)
    return (sents[0] if sents else caption.strip()), caption.strip()


def _summary(values: Sequence[float]) -> dict[str, float]:
    if len(values) == 0:
        return {"n": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "mean": round(float(a.mean()), 2), "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "max": float(a.max())}


def length_stats(captions: Iterable[str], tokenizer: Any = None, context_length: int = 77) -> dict[str, Any]:
    """Characters, words, sentences and CLIP tokens per caption, and the fraction of captions
    longer than ``context_length`` tokens *including* the start and end tokens (what CLIP's text
    tower would truncate). ``tokenizer`` defaults to :func:`clipforge.tokenizer.get_tokenizer`."""
    caps = [c for c in captions if isinstance(c, str)]
    if tokenizer is None:
        from ..tokenizer import get_tokenizer

        tokenizer = get_tokenizer(context_length)
    tokens = [len(ids) + 2 for ids in tokenizer.encode_batch(caps)] if caps else []
    over = sum(t > context_length for t in tokens)
    return {
        "captions": len(caps),
        "characters": _summary([len(c) for c in caps]),
        "words": _summary([len(c.split()) for c in caps]),
        "sentences": _summary([len(split_sentences(c)) for c in caps]),
        "tokens": _summary(tokens),
        "over_context": int(over),
        "fraction_over_context": round(over / len(caps), 6) if caps else 0.0,
        "context_length": context_length,
    }


def corpus_length_stats(records: Iterable[dict[str, Any]], tokenizer: Any = None, context_length: int = 77,
                        by_language: bool = True) -> dict[str, Any]:
    """:func:`length_stats` over every caption of a corpus (records from
    :func:`clipforge.data.captions.caption_records`), and per language where captions are tagged."""
    all_caps: list[str] = []
    per_lang: dict[str, list[str]] = {}
    for rec in records:
        caps = rec["captions"]
        all_caps += caps
        langs = rec.get("caption_langs")
        if by_language and langs:
            for c, lang in zip(caps, langs):
                per_lang.setdefault(lang, []).append(c)
    out = {"all": length_stats(all_caps, tokenizer, context_length)}
    for lang in sorted(per_lang):
        out[lang] = length_stats(per_lang[lang], tokenizer, context_length)
    return out
