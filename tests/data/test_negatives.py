"""Hard-negative generation, checked against the ground truth of ``shapes`` (its ``objects``)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from clipforge.data.negatives import (
    NEGATIVE_TYPES,
    NegativesDataset,
    change_count,
    generate,
    negate,
    negatives_for_captions,
    negatives_for_item,
    replace_attribute,
    replace_object,
    replace_relation,
    shuffle_words,
    swap_attribute,
    swap_objects,
)
from clipforge.data.shapes import COLORS, COUNT_WORDS, RELATIONS, SHAPES, SIZES, ShapesGenerator
from clipforge.data.vocabulary import ATTRIBUTES, OBJECTS, WORD, normalize, noun_number

ARTICLES = {"a", "an"}


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def diff_positions(a: str, b: str) -> list[int]:
    wa, wb = words(a), words(b)
    assert len(wa) == len(wb), (a, b)
    return [i for i, (x, y) in enumerate(zip(wa, wb)) if x != y and not (x in ARTICLES and y in ARTICLES)]


def category(word: str) -> str | None:
    return next((cat for cat, classes in ATTRIBUTES.items() if any(word in c for c in classes)), None)


def size_class(word: str) -> int:
    return next(i for i, c in enumerate(ATTRIBUTES["size"]) if word in c)


def shapes_samples():
    out = []
    for split, n in (("train", 240), ("relations", 40), ("counting", 40)):
        g = ShapesGenerator(split, seed=3, image_size=16)
        out += [g.sample(i) for i in range(n)]
    return out


@pytest.fixture(scope="module")
def generated():
    return [(s, negatives_for_captions(s.captions, per_type=2, seed=i)) for i, s in enumerate(shapes_samples())]


def test_every_type_is_produced_and_none_equals_a_true_caption(generated):
    seen = Counter()
    for s, negs in generated:
        true = {normalize(c) for c in s.captions}
        for kind, caps in negs.items():
            assert kind in NEGATIVE_TYPES and caps and all(isinstance(c, str) for c in caps)
            seen[kind] += len(caps)
            for c in caps:
                assert normalize(c) not in true, (kind, c, s.captions)
            assert len({normalize(c) for c in caps}) == len(caps)
    assert set(seen) == set(NEGATIVE_TYPES), seen


def test_replace_attribute_changes_one_attribute_to_a_value_not_in_the_image(generated):
    checked = 0
    for s, negs in generated:
        colors, sizes = {o.color for o in s.objects}, {size_class(o.size) for o in s.objects}
        for neg in negs.get("replace_attribute", []):
            pos = diff_positions(s.captions[0], neg)
            assert len(pos) == 1, (s.captions[0], neg)
            old, new = words(s.captions[0])[pos[0]], words(neg)[pos[0]]
            assert category(old) == category(new) is not None
            if category(new) == "color":
                assert new not in colors, (neg, colors)
            else:
                assert category(new) == "size" and size_class(new) not in sizes, (neg, sizes)
            checked += 1
    assert checked > 200


def test_replace_object_changes_one_shape_to_one_not_in_the_image(generated):
    checked = 0
    for s, negs in generated:
        present = {o.shape for o in s.objects}
        for neg in negs.get("replace_object", []):
            pos = diff_positions(s.captions[0], neg)
            assert len(pos) == 1
            old, new = words(s.captions[0])[pos[0]], words(neg)[pos[0]]
            (old_sg, old_num), (new_sg, new_num) = noun_number(old), noun_number(new)
            assert old_num == new_num  # number kept
            assert old_sg in present and new_sg in OBJECTS["shape"] and new_sg not in present
            checked += 1
    assert checked > 200


def test_change_count_changes_the_number_and_keeps_grammar(generated):
    checked = 0
    for s, negs in generated:
        if s.kind != "count":
            assert "change_count" not in negs or "shapes" in s.captions[0]
            continue
        n, noun_sg = len(s.objects), s.objects[0].shape
        for neg in negs.get("change_count", []):
            w_old, w_new = words(s.captions[0]), words(neg)
            pos = diff_positions(s.captions[0], neg)
            k = w_old.index(COUNT_WORDS[n])
            assert k in pos and w_new[k] != COUNT_WORDS[n]
            m = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
                 "ten": 10}[w_new[k]]
            assert m != n
            noun = w_new[k + 2]  # "<count> <color> <noun>"
            assert noun == (noun_sg if m == 1 else noun_sg + "s"), neg
            assert set(pos) <= {k, k + 2}
            checked += 1
    assert checked > 50


def test_relation_types_match_the_scene(generated):
    checked = 0
    for s, negs in generated:
        if s.kind != "relation":
            continue
        (o1, o2), cap = s.objects, s.captions[0]
        rel = next(r for r in sorted(RELATIONS, key=len, reverse=True) if f" {r} " in cap)
        a = lambda w: "an" if w[0] in "aeiou" else "a"  # noqa: E731
        np1, np2 = f"{a(o1.color)} {o1.color} {o1.shape}", f"{a(o2.color)} {o2.color} {o2.shape}"
        assert cap == f"{np1} {rel} {np2}."
        assert negs["swap_objects"] == [f"{np2} {rel} {np1}."]  # the two noun phrases trade places
        assert negs["replace_relation"] == [f"{np1} {RELATIONS[rel]} {np2}."]  # the converse relation
        if o1.color != o2.color:
            want = f"{a(o2.color)} {o2.color} {o1.shape} {rel} {a(o1.color)} {o1.color} {o2.shape}."
            assert negs["swap_attribute"] == [want]
        else:
            assert "swap_attribute" not in negs
        checked += 1
    assert checked >= 40


def test_shuffle_and_negate(generated):
    for s, negs in generated:
        for neg in negs.get("shuffle_words", []):
            assert sorted(words(neg)) == sorted(words(s.captions[0])) and words(neg) != words(s.captions[0])
        for neg in negs.get("negate", []):
            w = words(neg)
            assert w[:3] in (["there", "is", "no"], ["there", "are", "no"])
            pos = words(s.captions[0])
            assert w[3:] == pos[1:], (neg, s.captions[0])  # the determiner or count became "no"


def test_hand_written_cases():
    rng = np.random.default_rng(0)
    assert replace_relation("A cat sitting under a wooden table.", rng) == "A cat sitting over a wooden table."
    assert swap_objects("A dog to the left of the old house.", rng) == "The old house to the left of a dog."
    assert negate("there are three cats.", rng) == "there are no cats."
    assert negate("A dog.", rng) == "There is no dog."
    assert change_count("there is one cat on the bed.", rng, avoid=list(COUNT_WORDS[3:]) +
                        ["five", "six", "seven", "eight", "nine", "ten"]) == "there are two cats on the bed."
    assert change_count("2 men riding.", rng, avoid=["3", "4", "5", "6", "7", "8", "9", "10", "three", "four", "five",
                                                     "six", "seven", "eight", "nine", "ten"]) == "1 man riding."
    assert replace_object("an orange.", rng, avoid=[w for w in ("apple", "banana", "cake", "pizza", "lemon",
                                                               "cherry", "strawberry", "bread", "carrot", "tomato",
                                                               "grape")]) == "an egg."
    # "orange" before a noun is a color, not a fruit
    out = replace_attribute("an orange circle.", rng)
    assert words(out)[1] in {w for c in ATTRIBUTES["color"] for w in c} and words(out)[2] == "circle"
    assert out.startswith("a ") or out.startswith("an ")


@pytest.mark.parametrize("fn, caption", [
    (replace_attribute, "a dog."), (swap_attribute, "a red circle."), (replace_object, "an idea."),
    (swap_objects, "a red circle."), (replace_relation, "a red circle."), (change_count, "a red circle."),
    (shuffle_words, "circle."), (shuffle_words, "dog dog dog"), (negate, "there is no dog."),
    (negate, "toy, entertainment, rubik"), (swap_attribute, "a small red triangle, a small blue triangle."),
])
def test_returns_none_when_the_type_does_not_apply(fn, caption):
    assert fn(caption, np.random.default_rng(0)) is None


def test_deterministic_and_validated():
    a = negatives_for_captions(["a red circle above a blue star."], seed=5, per_type=3)
    assert a == negatives_for_captions(["a red circle above a blue star."], seed=5, per_type=3)
    assert generate("a red circle.", "replace_attribute", 1) == generate("a red circle.", "replace_attribute", 1)
    with pytest.raises(ValueError, match="unknown negative type 'bogus'"):
        negatives_for_captions(["a"], types=["bogus"])
    with pytest.raises(ValueError, match="source"):
        negatives_for_captions(["a"], source="middle")
    assert negatives_for_captions([]) == {}


def test_item_format_objects_and_training_items():
    from clipforge.data import build_dataset
    from clipforge.train.data import TrainItems

    g = ShapesGenerator("train", seed=0, image_size=16)
    s = g.sample(0)
    item = {"captions": s.captions, "objects": s.objects, "negatives": s.negatives}
    merged = negatives_for_item(item, merge=True)
    for k, v in s.negatives.items():
        assert merged[k][: len(v)] == v  # the dataset's own negatives are kept first
    assert set(negatives_for_item(item)) <= set(NEGATIVE_TYPES)
    # an object named in avoid (here: every other shape) leaves no shape to replace with
    only = {"captions": ["a red circle."], "objects": [{"shape": sh, "color": "red", "size": "small"} for sh in SHAPES]}
    negs = negatives_for_item(only, types=["replace_object"])
    assert all(w not in SHAPES for n in negs.get("replace_object", []) for w in words(n)[2:])

    ds = NegativesDataset(build_dataset("shapes", size=8, image_size=16), types=["replace_attribute", "change_count"])
    items = TrainItems(ds, seed=0, image_size=16, negatives=2, negative_types=("replace_attribute", "change_count"))
    out = items[(0, 3)]
    assert "error" not in out and 1 <= len(out["negatives"]) <= 2
    assert ds.label_views is not None  # attributes of the wrapped dataset pass through
    assert set(ds[3]["negatives"]) >= {"replace_attribute"}
    assert COLORS and SIZES  # imported ground-truth tables are the ones the generator avoids
