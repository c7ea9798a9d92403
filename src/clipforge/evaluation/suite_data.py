"""What an evaluation suite reads from a dataset: labelled images per label view, a retrieval
set, images with typed hard-negative captions, count-choice sets and an in/out pair for OOD
detection. Each piece carries a ``spec`` string that identifies it exactly (dataset, split,
size, seed, image size), which keys the embedding cache.

:class:`ShapesSuiteData` provides every piece for the procedural ``shapes`` dataset:

- classification: the ``shape``/``color``/``object`` views on the held-out ``compositional``
  split (color-shape pairs never seen in training), ``count`` on ``counting``; the probes
  train on single-object images of ``train`` (with a seed other than training's) and pick
  their regularization on ``val``;
- retrieval: every caption of every ``val`` image;
- compositionality: ``val`` images, their first caption (the one the negatives were written
  from) and the dataset's typed negatives (color, shape, count, relation, swap);
- counting: each ``counting`` image with the four captions that differ only in the number;
- OOD: in-distribution = ``compositional`` single objects, out-of-distribution = procedural
  textures (noise, stripes, gradients, checkerboards) that contain no shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data import LABEL_VIEWS, build_dataset
from ..data.shapes import COUNT_WORDS


@dataclass
class Labelled:
    images: list[Tensor]
    labels: Tensor
    classnames: list[str]
    templates: list[str]
    spec: str
    captions: list[list[str]] = field(default_factory=list)  # each image's own captions (CapS-Adapter support)


def labelled_items(ds, view: str, spec: dict, spec_key: str, keep=lambda item: True) -> Labelled:
    """The images of ``ds`` that carry a ``view`` label (and pass ``keep``), with labels and captions."""
    images, labels, captions = [], [], []
    for i in range(len(ds)):
        item = ds[i]
        if view in item["labels"] and keep(item):
            images.append(item["image"])
            labels.append(item["labels"][view])
            captions.append(list(item["captions"]))
    return Labelled(images, torch.tensor(labels, dtype=torch.long), list(spec["classes"]), list(spec["templates"]),
                    spec_key, captions)


def subset(lab: Labelled, every: int, offset: int) -> Labelled:
    """Every ``every``-th sample starting at ``offset`` (e.g. the even and odd halves of a split)."""
    idx = list(range(offset, len(lab.images), every))
    return Labelled([lab.images[i] for i in idx], lab.labels[idx], lab.classnames, lab.templates,
                    f"{lab.spec}/every={every}:{offset}", [lab.captions[i] for i in idx] if lab.captions else [])


@dataclass
class RetrievalSet:
    images: list[Tensor]
    captions: list[str]
    owner: Tensor  # caption j describes image owner[j]
    spec: str
    split: str = "val"


def retrieval_set(ds, spec: str, split: str) -> RetrievalSet:
    """Every image of ``ds`` with every one of its captions."""
    images, captions, owner = [], [], []
    for i in range(len(ds)):
        item = ds[i]
        images.append(item["image"])
        captions.extend(item["captions"])
        owner.extend([i] * len(item["captions"]))
    return RetrievalSet(images, captions, torch.tensor(owner), spec, split)


@dataclass
class NegativeSet:
    images: list[Tensor]
    positives: list[str]
    negatives: list[dict[str, list[str]]]
    spec: str


@dataclass
class CountSet:
    images: list[Tensor]
    candidates: list[list[str]]  # per image, one caption per count
    true_index: Tensor
    spec: str


@dataclass
class OODSet:
    in_images: list[Tensor]
    out_images: list[Tensor]
    classnames: list[str]
    templates: list[str]
    in_spec: str
    out_spec: str
    out_name: str = "textures"


def textures(n: int, size: int, seed: int) -> list[Tensor]:
    """Shape-free images: Gaussian noise, stripes, color gradients and checkerboards."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        kind = i % 4
        c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if kind == 0:
            img = rng.normal(rng.uniform(60, 190), rng.uniform(20, 70), (size, size, 3))
        elif kind == 1:
            freq, angle = rng.uniform(3, 12), rng.uniform(0, np.pi)
            t = (np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle))) > 0)[..., None]
            img = np.where(t, c1, c2)
        elif kind == 2:
            t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
            t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
            img = c1 * (1 - t) + c2 * t
        else:
            cells = int(rng.integers(2, 9))
            t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2)[..., None]
            img = np.where(t > 0, c1, c2)
        out.append(torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous())
    return out


@dataclass
class ShapesSuiteData:
    image_size: int
    size: int = 500
    seed: int = 12345
    name: str = "shapes"
    _splits: dict[str, Any] = field(default_factory=dict, repr=False)
    default_view = "shape"  # the view calibration, robustness and few-shot use
    probe_views = ("shape", "color")

    def unsupported(self, task: str) -> str | None:
        return None  # shapes provides every piece

    def _split(self, split: str, size: int | None = None):
        size = size or self.size
        key = f"{split}:{size}"
        if key not in self._splits:
            self._splits[key] = build_dataset(
                "shapes", split=split, size=size, seed=self.seed, image_size=self.image_size
            )
        return self._splits[key]

    def _spec(self, split: str, size: int | None = None, extra: str = "") -> str:
        return f"shapes/{split}/n={size or self.size}/seed={self.seed}/px={self.image_size}{extra}"

    # ------------------------------------------------------------------ classification
    def classification_views(self) -> list[tuple[str, str]]:
        """(task name, label view) pairs for zero-shot classification."""
        return [("object", "object"), ("shape", "shape"), ("color", "color"), ("count", "count")]

    def labelled(self, view: str, split: str | None = None, size: int | None = None) -> Labelled:
        split = split or ("counting" if view == "count" else "compositional")
        keep = (lambda item: True) if view == "count" else (lambda item: item["kind"] == "single")
        return labelled_items(
            self._split(split, size), view, LABEL_VIEWS[view], self._spec(split, size, f"/view={view}"), keep
        )

    def probe_splits(self, view: str = "shape") -> tuple[Labelled, Labelled, Labelled, Labelled]:
        """(train, val, test, held-out) for the linear and few-shot probes: single objects of
        ``train`` (4x the evaluation size, since only ~30% of scenes are single objects); the
        even and odd halves of ``val``'s single objects for model selection and the
        in-distribution test; and the held-out color-shape pairs of ``compositional``, where a
        probe fitted on seen pairs meets combinations it never saw."""
        val = self.labelled(view, "val", 4 * self.size)
        return (self.labelled(view, "train", 4 * self.size), subset(val, 2, 0), subset(val, 2, 1),
                self.labelled(view, "compositional"))

    # ------------------------------------------------------------------ retrieval etc.
    def retrieval(self) -> RetrievalSet:
        return retrieval_set(self._split("val"), self._spec("val"), "val")

    def negative_set(self) -> NegativeSet:
        ds = self._split("val")
        images, positives, negatives = [], [], []
        for i in range(len(ds)):
            item = ds[i]
            if item["negatives"]:
                images.append(item["image"])
                positives.append(item["captions"][0])  # the caption the negatives were written from
                negatives.append(item["negatives"])
        return NegativeSet(images, positives, negatives, self._spec("val", extra="/with-negatives"))

    def count_set(self) -> CountSet:
        ds = self._split("counting")
        images, candidates, truth = [], [], []
        for i in range(len(ds)):
            item = ds[i]
            pos = item["captions"][0]
            negs = item["negatives"]["count"]
            # every candidate has the wording of variant 0; order them by the count they state
            options = sorted([pos, *negs], key=lambda c: COUNT_WORDS.index(c.split()[0]))
            images.append(item["image"])
            candidates.append(options)
            truth.append(options.index(pos))
        return CountSet(images, candidates, torch.tensor(truth), self._spec("counting"))

    def ood_set(self) -> OODSet:
        inside = self.labelled("shape")
        out = textures(len(inside.images), self.image_size, self.seed)
        return OODSet(inside.images, out, inside.classnames, inside.templates, inside.spec,
                      f"textures/n={len(out)}/seed={self.seed}/px={self.image_size}")


OOD_PARTNER = {"openclipart": "emoji", "emoji": "openclipart"}


@dataclass
class CorpusSuiteData:
    """A built corpus (``clipforge data build NAME``): zero-shot on its ``test`` split for every
    label view, probes trained on ``train`` (at most 4x the evaluation size) with ``val``
    halves for selection and test, retrieval with every caption of ``test``, OOD against the
    other corpus (``openclipart`` in, ``emoji`` out and the reverse). No typed negatives or
    count captions: compositionality and counting are skipped, with the reason recorded."""

    name: str
    image_size: int
    size: int = 500
    seed: int = 12345
    root: str | None = None
    _splits: dict[str, Any] = field(default_factory=dict, repr=False)

    def _split(self, split: str, size: int | None = None, name: str | None = None):
        name = name or self.name
        key = f"{name}:{split}:{size}"
        if key not in self._splits:
            self._splits[key] = build_dataset(name, split=split, size=size, seed=self.seed, image_size=self.image_size,
                                              **({"root": self.root} if self.root and name == self.name else {}))
        return self._splits[key]

    @property
    def views(self) -> dict[str, dict]:
        return self._split("test").label_views

    @property
    def default_view(self) -> str:
        return next(iter(self.views))

    @property
    def probe_views(self) -> tuple[str, ...]:
        return tuple(self.views)

    def unsupported(self, task: str) -> str | None:
        if task == "compositionality":
            return f"{self.name} has no typed hard-negative captions"
        if task == "counting":
            return f"{self.name} has no count captions"
        if task == "regions":
            return f"{self.name} has no region annotations (the regions task runs on shapes)"
        if task == "ood":
            if self.name not in OOD_PARTNER:
                return f"no out-of-distribution partner corpus for {self.name}"
            from ..data.shards import corpus_root

            if not (corpus_root(OOD_PARTNER[self.name]) / "manifest.json").exists():
                partner = OOD_PARTNER[self.name]
                return f"the partner corpus '{partner}' is not built (clipforge data build {partner})"
        return None

    def _spec(self, split: str, size, extra: str = "", name: str | None = None) -> str:
        return f"{name or self.name}/{split}/n={size}/seed={self.seed}/px={self.image_size}{extra}"

    def classification_views(self) -> list[tuple[str, str]]:
        return [(v, v) for v in self.views]

    def labelled(self, view: str, split: str = "test", size: int | None = None, name: str | None = None) -> Labelled:
        ds = self._split(split, size, name)
        return labelled_items(ds, view, ds.label_views[view], self._spec(split, size, f"/view={view}", name))

    def probe_splits(self, view: str):
        val = self.labelled(view, "val")
        return self.labelled(view, "train", 4 * self.size), subset(val, 2, 0), subset(val, 2, 1), None

    def retrieval(self) -> RetrievalSet:
        return retrieval_set(self._split("test", self.size), self._spec("test", self.size), "test")

    def ood_set(self) -> OODSet:
        inside = self.labelled(self.default_view, "test", self.size)
        other = OOD_PARTNER[self.name]
        out = self._split("test", self.size, other)
        images = [out[i]["image"] for i in range(len(out))]
        return OODSet(inside.images, images, inside.classnames, inside.templates, inside.spec,
                      self._spec("test", self.size, name=other), out_name=other)


def suite_data(dataset: str, image_size: int, size: int = 500, seed: int = 12345, root: str | None = None):
    """The suite's view of ``dataset``: ``shapes`` or a built corpus (``openclipart``, ``emoji``)."""
    if dataset == "shapes":
        return ShapesSuiteData(image_size, size, seed)
    from ..data import DATASETS

    if dataset in DATASETS.names():
        return CorpusSuiteData(dataset, image_size, size, seed, root)
    raise ValueError(f"dataset '{dataset}' has no evaluation suite data; available: shapes, {', '.join(OOD_PARTNER)}")
