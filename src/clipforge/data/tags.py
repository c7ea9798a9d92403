"""Short tags of a caption: a simple, deterministic keyword extractor (HQ-CLIP's ``short_tags``
when a dataset stores none).

HQ-CLIP (Wei et al., 2025) stores, per image, a list of short tags written by a vision-language
model. Without such a model, :func:`keyword_tags` derives tags from a caption by rule: the framing
("a picture of", "there are") is dropped, the rest is cut into phrases at commas, "and", "with",
a few prepositions ("on", "in", "of", ...), "colored" and the spatial relations of
:data:`clipforge.data.vocabulary.RELATIONS`, and each phrase keeps its words minus determiners,
numbers and a few function words. The tags are the distinct
phrases joined by ", ":

    "a small blue triangle and a large green circle."  ->  "small blue triangle, large green circle"
    "there are three red circles above a star."         ->  "red circles, star"

It is English-only and knows no grammar (no part-of-speech tagging): a caption with non-ASCII
text, or one in which no word survives, is returned unchanged.
"""
from __future__ import annotations

import re

from .vocabulary import DETERMINERS, RELATIONS, WORD

_FRAMING = re.compile(r"^(?:(?:a|an) (?:picture|photo|image|illustration|drawing) (?:of|showing|that shows)|"
                      r"this is|here is|here are|there is|there are)\s+", re.IGNORECASE)
# phrase boundaries besides "," and ";" (longest first, so "on top of" wins over "on")
SEPARATORS = tuple(sorted({*RELATIONS, "next to", "beside", "and", "with", "on", "in", "at", "of", "by", "from", "for",
                           "colored", "coloured"}, key=len, reverse=True))
_SEPARATORS = re.compile(r",|;|\b(?:" + "|".join(map(re.escape, SEPARATORS)) + r")\b", re.IGNORECASE)
# function words dropped inside a phrase (determiners and numbers come from the vocabulary)
STOP_WORDS = frozenset({"is", "are", "was", "were", "be", "it", "they", "there", "here", "to"})


def keyword_tags(caption: str) -> str:
    """The short tags of ``caption`` (module docstring): its content phrases joined by ", "."""
    if not caption.isascii():
        return caption
    body = _FRAMING.sub("", caption.strip().rstrip(".!?").strip())
    tags: list[str] = []
    for phrase in _SEPARATORS.split(body):
        words = [w for w in WORD.findall(phrase.lower()) if w not in DETERMINERS and w not in STOP_WORDS]
        tag = " ".join(words)
        if tag and tag not in tags:
            tags.append(tag)
    return ", ".join(tags) or caption
