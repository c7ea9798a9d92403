"""``shapes``: a procedural image-caption dataset that needs no download.

Each image holds one to four objects (circle, square, triangle, star, hexagon) in six
colors and two sizes on a dark background; captions state attributes, counts ("three red
circles") and spatial relations ("a blue square left of a green triangle") through several
templates. Everything is a pure function of ``(seed, split, index)``, so any size is
available and two processes agree on every pixel.

Splits
- ``train``/``val``: single objects, counted groups, relation pairs and mixed scenes. Five
  color-shape pairs (``HELDOUT_PAIRS``) never appear in them.
- ``compositional``: single objects of the held-out pairs only (compositional generalization).
- ``counting``: groups of one to four identical objects, with all count captions as candidates.
- ``relations``: two objects with their true relation and the swapped one.

Label views for zero-shot classification (``LABEL_VIEWS``): ``shape``, ``color``, ``count``
and ``object`` (color + shape, 30 classes).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon")
PLURALS = {s: s + "s" for s in SHAPES}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SIZES = {"small": 0.11, "large": 0.19}  # radius as a fraction of the image side
COUNT_WORDS = ("zero", "one", "two", "three", "four")
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Color-shape pairs never shown in train/val: each shape and each color still appears elsewhere.
HELDOUT_PAIRS = frozenset(
    {("red", "triangle"), ("green", "star"), ("blue", "circle"), ("yellow", "hexagon"), ("purple", "square")}
)
SPLITS = ("train", "val", "compositional", "counting", "relations")

LABEL_VIEWS: dict[str, dict] = {
    "shape": {"classes": list(SHAPES), "templates": ["a {}.", "a picture of a {}.", "a {} on a dark background."]},
    "color": {"classes": list(COLORS), "templates": ["a {} shape.", "something {}.", "a {} object."]},
    "count": {
        "classes": ["one", "two", "three", "four"],
        "templates": ["{} shapes.", "a picture of {} objects.", "there are {} things."],
    },
    "object": {
        "classes": [f"{c} {s}" for c in COLORS for s in SHAPES],
        "templates": ["a {}.", "a picture of a {}.", "a {} on a dark background."],
    },
}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    x: float  # center, as a fraction of the image side
    y: float


@dataclass
class ShapesSample:
    image: np.ndarray  # uint8 [H, W, 3]
    captions: list[str]
    objects: list[ShapeObject]
    kind: str  # single | count | relation | mixed
    labels: dict[str, int] = field(default_factory=dict)
    negatives: dict[str, list[str]] = field(default_factory=dict)  # type -> hard-negative captions
    background: tuple[int, int, int] = (0, 0, 0)  # render(objects, size, background) draws ``image`` again

    @property
    def boxes(self) -> np.ndarray:
        """[N, 4] float32 normalized xyxy boxes of the objects, in ``objects`` order (:func:`object_box`)."""
        return np.array([object_box(o) for o in self.objects], dtype=np.float32).reshape(-1, 4)

    @property
    def region_captions(self) -> list[str]:
        """One caption per box (:func:`region_caption`)."""
        return [region_caption(o) for o in self.objects]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        n, rr = 4, [r * 1.15] * 4
        rot += math.pi / 4
    elif shape == "triangle":
        n, rr = 3, [r * 1.2] * 3
        rot -= math.pi / 2
    elif shape == "hexagon":
        n, rr = 6, [r] * 6
    elif shape == "star":
        n, rr = 10, [r * 1.2 if k % 2 == 0 else r * 0.5 for k in range(10)]
        rot -= math.pi / 2
    else:
        raise ValueError(shape)
    return [
        (cx + rr[k] * math.cos(rot + 2 * math.pi * k / n), cy + rr[k] * math.sin(rot + 2 * math.pi * k / n))
        for k in range(n)
    ]


def object_box(obj: ShapeObject) -> tuple[float, float, float, float]:
    """The tight box of a drawn object, normalized ``(x0, y0, x1, y1)`` (fractions of the image side):
    the circle's extent or the min/max of the polygon's vertices, as :func:`render` draws them."""
    r = SIZES[obj.size]
    if obj.shape == "circle":
        xs, ys = (obj.x - r, obj.x + r), (obj.y - r, obj.y + r)
    else:
        pts = _polygon(obj.shape, obj.x, obj.y, r, 0.0)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (max(0.0, min(xs)), max(0.0, min(ys)), min(1.0, max(xs)), min(1.0, max(ys)))


def object_captions(color: str, shape: str, size: str) -> list[str]:
    """The caption templates of a one-object scene; region captions use the same ones."""
    return [
        f"{_article(color)} {color} {shape}.",
        f"{_article(size)} {size} {color} {shape}.",
        f"a picture of {_article(color)} {color} {shape}.",
        f"{_article(shape)} {shape} colored {color}.",
    ]


def region_caption(obj: ShapeObject) -> str:
    """The caption of one object's region: the size-color-shape template of :func:`object_captions`
    ("a small red circle.")."""
    return object_captions(obj.color, obj.shape, obj.size)[1]


def class_descriptions(view: str) -> list[list[str]]:
    """Descriptions of each class of the label view ``view`` (``object``, ``shape``, ``color``; in
    ``LABEL_VIEWS[view]["classes"]`` order): the region captions (:func:`region_caption`) of every object
    of the class, all sizes (and, for ``shape`` / ``color``, all colors / shapes), e.g. "red circle" ->
    ["a small red circle.", "a large red circle."]. GRAIN's test-time descriptions for ``shapes``."""
    combos = [(c, s, z) for c in COLORS for s in SHAPES for z in SIZES]
    match = {"object": lambda cls, c, s: cls == f"{c} {s}", "shape": lambda cls, c, s: cls == s,
             "color": lambda cls, c, s: cls == c}
    if view not in match:
        raise ValueError(f"class descriptions exist for the views {sorted(match)}, not '{view}'")
    return [[region_caption(ShapeObject(s, c, z, 0.5, 0.5)) for c, s, z in combos if match[view](cls, c, s)]
            for cls in LABEL_VIEWS[view]["classes"]]


def render(
    objects: list[ShapeObject], image_size: int, background: tuple[int, int, int], supersample: int = 2
) -> np.ndarray:
    """Draw objects with anti-aliasing (supersampled then box-filtered)."""
    s = image_size * supersample
    img = Image.new("RGB", (s, s), background)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        cx, cy, r = obj.x * s, obj.y * s, SIZES[obj.size] * s
        color = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r, 0.0), fill=color)
    if supersample > 1:
        img = img.resize((image_size, image_size), Image.BOX)
    return np.array(img, dtype=np.uint8)  # a writable copy


EDITS = ("color", "remove")


def edit_scene(objects: list[ShapeObject], rng: np.random.Generator, kind: str | None = None
               ) -> tuple[list[ShapeObject], dict]:
    """An edited copy of a scene whose captions no longer hold (CLIP-IN's negative images, by
    re-rendering the object list): ``"color"``: one object drawn at random takes another color
    (never one that forms a held-out color-shape pair, so no compositional test pair is shown);
    ``"remove"``: one object is removed (a one-object scene becomes its bare background).
    ``kind`` None draws one of :data:`EDITS`. Returns (objects, {"kind", "object": its index,
    "color": the new color or None}).

    Every caption that names the objects' colors, shapes or count is false for the edited scene;
    a caption that states only the number of shapes ("three shapes.") survives a color edit."""
    if not objects:
        raise ValueError("a scene without objects has nothing to edit")
    kind = EDITS[int(rng.integers(len(EDITS)))] if kind is None else kind
    i = int(rng.integers(len(objects)))
    if kind == "color":
        obj = objects[i]
        choices = [c for c in COLORS if c != obj.color and (c, obj.shape) not in HELDOUT_PAIRS]
        color = choices[int(rng.integers(len(choices)))]
        return [*objects[:i], replace(obj, color=color), *objects[i + 1:]], {"kind": kind, "object": i, "color": color}
    if kind == "remove":
        return [*objects[:i], *objects[i + 1:]], {"kind": kind, "object": i, "color": None}
    raise ValueError(f"unknown scene edit '{kind}'; choose one of {EDITS}")


def negative_images(objects: list[ShapeObject], background: tuple[int, int, int], image_size: int, k: int,
                    rng: np.random.Generator) -> list[tuple[np.ndarray, dict]]:
    """``k`` edited copies of a scene (:func:`edit_scene`, the edit kinds alternating from a random
    first one), each re-rendered as :func:`render` drew the original: [(uint8 [H, W, 3], edit)]."""
    first = int(rng.integers(len(EDITS)))
    out = []
    for j in range(k):
        edited, edit = edit_scene(objects, rng, EDITS[(first + j) % len(EDITS)])
        out.append((render(edited, image_size, tuple(background)), edit))
    return out


class ShapesGenerator:
    """Samples scenes for one split; ``sample(index)`` is deterministic."""

    def __init__(self, split: str = "train", seed: int = 0, image_size: int = 64):
        if split not in SPLITS:
            raise ValueError(f"unknown shapes split '{split}'; choose one of {SPLITS}")
        self.split, self.seed, self.image_size = split, seed, image_size
        self._split_id = zlib.crc32(split.encode())
        pairs = [(c, s) for c in COLORS for s in SHAPES]
        self.seen_pairs = [p for p in pairs if p not in HELDOUT_PAIRS]
        self.heldout_pairs = sorted(HELDOUT_PAIRS)

    # -- scene sampling ------------------------------------------------------------------
    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._split_id, index])

    def _pair(self, rng) -> tuple[str, str]:
        pool = self.heldout_pairs if self.split == "compositional" else self.seen_pairs
        return pool[rng.integers(len(pool))]

    def _place(self, rng, sizes: list[str], region=None) -> list[tuple[float, float]] | None:
        """Non-overlapping centers for objects of the given sizes (rejection sampling)."""
        centers: list[tuple[float, float]] = []
        for size in sizes:
            r = SIZES[size] * 1.25
            for _ in range(100):
                lo_x, hi_x, lo_y, hi_y = region or (r, 1 - r, r, 1 - r)
                x, y = rng.uniform(max(lo_x, r), min(hi_x, 1 - r)), rng.uniform(max(lo_y, r), min(hi_y, 1 - r))
                if all(math.hypot(x - cx, y - cy) > r + SIZES[sz] * 1.25 for (cx, cy), sz in zip(centers, sizes)):
                    centers.append((x, y))
                    break
            else:
                return None
        return centers

    def _kind(self, rng) -> str:
        if self.split in ("compositional",):
            return "single"
        if self.split == "counting":
            return "count"
        if self.split == "relations":
            return "relation"
        return ("single", "count", "relation", "mixed")[rng.choice(4, p=[0.3, 0.3, 0.25, 0.15])]

    def sample(self, index: int) -> ShapesSample:
        rng = self._rng(index)
        kind = self._kind(rng)
        background = tuple(int(v) for v in rng.integers(0, 60, size=3))
        for _ in range(20):
            built = getattr(self, f"_scene_{kind}")(rng)
            if built is not None:
                break
        else:  # pragma: no cover - placement of <= 4 objects always succeeds in practice
            raise RuntimeError("could not place objects")
        objects, captions, labels, negatives = built
        image = render(objects, self.image_size, background)
        return ShapesSample(image, captions, objects, kind, labels, negatives, background)

    def _labels(self, color: str, shape: str, count: int) -> dict[str, int]:
        return {
            "shape": SHAPES.index(shape),
            "color": list(COLORS).index(color),
            "count": count - 1,
            "object": LABEL_VIEWS["object"]["classes"].index(f"{color} {shape}"),
        }

    def _scene_single(self, rng):
        color, shape = self._pair(rng)
        size = list(SIZES)[rng.integers(2)]
        pos = self._place(rng, [size])
        if pos is None:
            return None
        obj = ShapeObject(shape, color, size, *pos[0])
        captions = object_captions(color, shape, size)
        other_color = [c for c in COLORS if c != color][rng.integers(len(COLORS) - 1)]
        other_shape = [s for s in SHAPES if s != shape][rng.integers(len(SHAPES) - 1)]
        negatives = {
            "color": [f"{_article(other_color)} {other_color} {shape}."],
            "shape": [f"{_article(color)} {color} {other_shape}."],
        }
        return [obj], captions, self._labels(color, shape, 1), negatives

    def _count_caption(self, n: int, color: str, shape: str, variant: int) -> str:
        noun = shape if n == 1 else PLURALS[shape]
        word = COUNT_WORDS[n]
        return [
            f"{word} {color} {noun}.",
            f"a picture of {word} {color} {noun}.",
            f"there {'is' if n == 1 else 'are'} {word} {color} {noun}.",
        ][variant]

    def _scene_count(self, rng):
        color, shape = self._pair(rng)
        n = int(rng.integers(1, 5))
        size = "small" if n > 2 else list(SIZES)[rng.integers(2)]
        pos = self._place(rng, [size] * n)
        if pos is None:
            return None
        objects = [ShapeObject(shape, color, size, x, y) for x, y in pos]
        captions = [self._count_caption(n, color, shape, v) for v in range(3)]
        negatives = {"count": [self._count_caption(m, color, shape, 0) for m in range(1, 5) if m != n]}
        return objects, captions, self._labels(color, shape, n), negatives

    def _scene_relation(self, rng):
        (c1, s1) = self._pair(rng)
        for _ in range(10):
            (c2, s2) = self._pair(rng)
            if (c2, s2) != (c1, s1):
                break
        rel = list(RELATIONS)[rng.integers(4)]
        # object 1 is placed in the half of the canvas its relation names
        if rel == "left of":
            r1, r2 = (0, 0.45, 0, 1), (0.55, 1, 0, 1)
        elif rel == "right of":
            r1, r2 = (0.55, 1, 0, 1), (0, 0.45, 0, 1)
        elif rel == "above":
            r1, r2 = (0, 1, 0, 0.45), (0, 1, 0.55, 1)
        else:
            r1, r2 = (0, 1, 0.55, 1), (0, 1, 0, 0.45)
        p1 = self._place(rng, ["small"], r1)
        p2 = self._place(rng, ["small"], r2)
        if p1 is None or p2 is None:
            return None
        objects = [ShapeObject(s1, c1, "small", *p1[0]), ShapeObject(s2, c2, "small", *p2[0])]
        a, b = f"{_article(c1)} {c1} {s1}", f"{_article(c2)} {c2} {s2}"
        captions = [f"{a} {rel} {b}.", f"{b} {RELATIONS[rel]} {a}."]
        negatives = {"relation": [f"{a} {RELATIONS[rel]} {b}."], "swap": [f"{b} {rel} {a}."]}
        return objects, captions, {}, negatives

    def _scene_mixed(self, rng):
        n = int(rng.integers(2, 5))
        pairs = [self._pair(rng) for _ in range(n)]
        sizes = [list(SIZES)[rng.integers(2)] if n == 2 else "small" for _ in range(n)]
        pos = self._place(rng, sizes)
        if pos is None:
            return None
        objects = [ShapeObject(s, c, z, x, y) for (c, s), z, (x, y) in zip(pairs, sizes, pos)]
        parts = [f"{_article(z)} {z} {c} {s}" for (c, s), z in zip(pairs, sizes)]
        plain = [f"{_article(c)} {c} {s}" for c, s in pairs]
        captions = [", ".join(parts[:-1]) + f" and {parts[-1]}.", ", ".join(plain[:-1]) + f" and {plain[-1]}.",
                    f"{COUNT_WORDS[n]} shapes."]
        return objects, captions, {}, {}
