"""A small hand-written English vocabulary shared by the caption rewriter and the hard-negative generator.

Written for this project (no WordNet download). It covers what ``shapes`` captions say
(colors, sizes, shapes, counts, spatial relations) plus a few hundred common words so that
the rules also fire on real captions.

Words of one category are grouped into *meaning classes*: a replacement for a hard negative
is drawn from another class (``small`` -> ``large``, never ``small`` -> ``tiny``), a paraphrase
from the same class.
"""
from __future__ import annotations

import re

from .shapes import COLORS, SHAPES

# category -> meaning classes (synonyms share a class; classes of a category exclude each other)
ATTRIBUTES: dict[str, list[tuple[str, ...]]] = {
    "color": [(c,) for c in COLORS] + [("black",), ("white",), ("gray", "grey"), ("brown",), ("pink",),
                                        ("gold", "golden"), ("silver",)],
    "size": [("small", "little", "tiny"), ("large", "big", "huge")],
    "height": [("tall",), ("short",)],
    "material": [("wooden",), ("metal", "metallic"), ("glass",), ("plastic",), ("paper",), ("stone",)],
    "openness": [("open",), ("closed",)],
    "fullness": [("empty",), ("full",)],
    "age": [("old",), ("new",)],
    "mood": [("happy", "smiling", "joyful"), ("sad", "unhappy"), ("angry",)],
    "temperature": [("hot",), ("cold",)],
    "wetness": [("wet",), ("dry",)],
    "brightness": [("bright",), ("dark",)],
    "speed": [("fast",), ("slow",)],
}

# category -> object nouns (singular). Replacing an object stays in its category.
OBJECTS: dict[str, tuple[str, ...]] = {
    "shape": tuple(SHAPES) + ("rectangle", "oval", "pentagon", "diamond", "heart", "cross", "arrow"),
    "animal": ("dog", "cat", "horse", "bird", "cow", "sheep", "fish", "elephant", "lion", "tiger", "bear", "rabbit",
               "mouse", "duck", "owl", "monkey", "frog", "snake", "butterfly", "bee"),
    "person": ("man", "woman", "boy", "girl", "child", "baby"),
    "vehicle": ("car", "bus", "truck", "bicycle", "train", "boat", "airplane", "motorcycle", "ship", "rocket"),
    "food": ("apple", "banana", "cake", "pizza", "orange", "lemon", "cherry", "strawberry", "bread", "egg",
             "carrot", "tomato", "grape"),
    "furniture": ("chair", "table", "bed", "sofa", "desk", "lamp", "shelf"),
    "building": ("house", "castle", "church", "tower", "barn", "bridge"),
    "plant": ("tree", "flower", "rose", "leaf", "cactus", "mushroom"),
    "thing": ("cup", "mug", "book", "phone", "computer", "clock", "key", "ball", "hat", "shoe", "umbrella", "bottle",
              "guitar", "flag", "sign", "card", "box", "bag", "pencil", "camera", "glasses", "bell", "candle"),
    "sky": ("sun", "moon", "cloud", "planet"),
}
# nouns that count things but are no object to replace
GENERIC_NOUNS = ("shape", "object", "thing", "item", "picture", "person", "people")
IRREGULAR_PLURALS = {"man": "men", "woman": "women", "child": "children", "mouse": "mice", "sheep": "sheep",
                     "fish": "fish", "person": "people", "foot": "feet", "tooth": "teeth", "glasses": "glasses",
                     "leaf": "leaves", "shelf": "shelves", "cactus": "cacti"}

COUNTS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
COUNT_VALUES = {w: i + 1 for i, w in enumerate(COUNTS)} | {str(i + 1): i + 1 for i in range(10)}

# spatial relations (multi-word first when matching) and their converse
RELATIONS: dict[str, str] = {
    "to the left of": "to the right of", "to the right of": "to the left of",
    "left of": "right of", "right of": "left of", "above": "below", "below": "above",
    "on top of": "underneath", "underneath": "on top of", "over": "under", "under": "over",
    "in front of": "behind", "behind": "in front of", "inside": "outside", "outside": "inside",
    "near": "far from", "far from": "near",
}
DETERMINERS = frozenset({"a", "an", "the", "this", "that", "some", "no", "every", "each", "its", "his", "her",
                         "their", "my", "our", "your"} | set(COUNT_VALUES))

WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")


def plural(noun: str) -> str:
    """English plural of a singular noun (irregular table, then spelling rules)."""
    low = noun.lower()
    if low in IRREGULAR_PLURALS:
        out = IRREGULAR_PLURALS[low]
    elif re.search(r"(s|x|z|ch|sh)$", low):
        out = low + "es"
    elif re.search(r"[^aeiou]y$", low):
        out = low[:-1] + "ies"
    else:
        out = low + "s"
    return match_case(out, noun)


_SINGULAR = {v: k for k, v in IRREGULAR_PLURALS.items()}


def singular(noun: str) -> str | None:
    """The singular of a plural noun this vocabulary knows, else None."""
    low = noun.lower()
    for word in known_nouns():
        if plural(word) == low and word != low:
            return match_case(word, noun)
    return match_case(_SINGULAR[low], noun) if low in _SINGULAR and _SINGULAR[low] != low else None


_NOUNS: frozenset[str] | None = None


def known_nouns() -> frozenset[str]:
    global _NOUNS
    if _NOUNS is None:
        _NOUNS = frozenset(w for ws in OBJECTS.values() for w in ws) | frozenset(GENERIC_NOUNS)
    return _NOUNS


def noun_number(word: str) -> tuple[str, str] | None:
    """``(singular, "sg"|"pl")`` for a noun this vocabulary knows, else None."""
    low = word.lower()
    if low in known_nouns():
        return low, "sg"
    s = singular(low)
    return (s, "pl") if s else None


def match_case(word: str, like: str) -> str:
    """``word`` capitalized the way ``like`` is (UPPER, Title or lower)."""
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def article_for(word: str) -> str:
    """``a`` or ``an`` before ``word`` (by its first letter, with a few spelled-out exceptions)."""
    low = word.lower()
    if low.startswith(("one", "uni", "use", "euro")):
        return "a"
    if low.startswith(("hour", "honest", "honor")):
        return "an"
    return "an" if low[:1] in "aeiou8" else "a"


def normalize(text: str) -> str:
    """Lower-case words only: how two captions are compared for equality."""
    return " ".join(w.lower() for w in WORD.findall(text))
