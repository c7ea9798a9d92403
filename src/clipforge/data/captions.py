"""Caption sources of a sample and the policy that picks one caption per training step.

Recent CLIP recipes train on more than the caption that came with the image:

- LaCLIP (Fan et al., 2023, "Improving CLIP Training with Language Rewrites") draws, at each
  step, uniformly from the original caption and its LLM rewrites -> ``rewrites``.
- ALIP (Yang et al., 2023, "ALIP: Adaptive Language-Image Pre-training with Synthetic Caption")
  pairs the raw web text with a synthetic caption from a captioning model -> ``synthetic``.
- "CLIP with Quality Captions: A Strong Pretraining for Vision Tasks" (Vasu et al., 2024)
  trains on a *mix* of synthetic and raw captions; the mix ratio is a knob -> :meth:`CaptionPolicy.mix`.
- HQ-CLIP (Wei et al., 2025, "HQ-CLIP: Leveraging Large Vision-Language Models to Create
  High-Quality Image-Text Datasets") stores per image a long description, ``short_tags`` and
  ``negative_descriptions`` (what is *not* in the image). The last are negatives, never a
  positive: :func:`source_negatives` turns them into typed negatives (``{"description": [...]}``),
  from which the training program draws each sample's hard negatives (``hqclip`` with ``negatives``).

A sample's sources are read by :func:`caption_sources`: ``item["caption_sources"]`` (a dict),
else top-level fields of those names; ``original`` defaults to ``item["captions"]``.

:class:`CaptionPolicy` samples one positive caption from a numpy Generator: a source with
probability proportional to its weight among the sources this sample has (empty sources drop
out and the rest are renormalized), then a caption of that source uniformly. When none of the
weighted sources has a caption it falls back along ``fallback`` (``original`` first).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

CAPTION_SOURCES = ("original", "rewrites", "synthetic", "short_tags", "negative_descriptions")
POSITIVE_SOURCES = ("original", "rewrites", "synthetic", "short_tags")


def _as_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"caption source '{name}' must be a string or a list of strings, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, (list, tuple)):  # rewrites stored per original caption: flatten
            out += _as_list(v, name)
        elif not isinstance(v, str):
            raise TypeError(f"caption source '{name}' holds a {type(v).__name__}, not a string: {v!r}")
        elif v.strip():
            out.append(v)
    return out


def caption_sources(item: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{source: [captions]}`` of a dataset item, for every name in :data:`CAPTION_SOURCES`."""
    given = item.get("caption_sources") or {}
    unknown = sorted(set(given) - set(CAPTION_SOURCES))
    if unknown:
        raise ValueError(f"caption_sources has unknown source(s) {unknown}; known: {CAPTION_SOURCES}")
    out = {}
    for name in CAPTION_SOURCES:
        value = given.get(name, item.get(name))
        if name == "original" and value is None:
            value = item.get("captions")
        out[name] = _as_list(value, name)
    return out


def source_negatives(item: Mapping[str, Any], kind: str = "description") -> dict[str, list[str]]:
    """The item's ``negative_descriptions`` as typed negatives ``{kind: [...]}`` (HQ-CLIP), merged
    with its existing ``negatives``."""
    out = {k: list(v) for k, v in (item.get("negatives") or {}).items()}
    negs = caption_sources(item)["negative_descriptions"]
    if negs:
        out[kind] = out.get(kind, []) + negs
    return out


@dataclass(frozen=True)
class CaptionPolicy:
    """How one positive caption is drawn per step.

    ``weights``: {source: weight >= 0} over :data:`POSITIVE_SOURCES`; ``{"original": 1}`` is plain
    CLIP, ``{"original": 1, "rewrites": 1}`` is LaCLIP-like (the original and its rewrites with
    equal probability per *source*; use ``per_caption=True`` to weight every caption alike, as
    LaCLIP's uniform draw over the original and its k rewrites does).
    ``fallback``: sources tried in order when every weighted source of a sample is empty.
    """

    weights: Mapping[str, float] = field(default_factory=lambda: {"original": 1.0})
    fallback: tuple[str, ...] = POSITIVE_SOURCES
    per_caption: bool = False

    def __post_init__(self):
        if not isinstance(self.weights, Mapping) or not self.weights:
            raise ValueError("CaptionPolicy.weights must be a non-empty {source: weight} mapping")
        for name, w in self.weights.items():
            if name == "negative_descriptions":
                raise ValueError("CaptionPolicy.weights['negative_descriptions']: negative descriptions say what "
                                 "is NOT in the image (HQ-CLIP); use them as negatives (source_negatives), "
                                 "not as a positive caption source")
            if name not in POSITIVE_SOURCES:
                raise ValueError(f"CaptionPolicy.weights['{name}']: unknown caption source; "
                                 f"choose from {POSITIVE_SOURCES}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"CaptionPolicy.weights['{name}'] must be a finite number >= 0, got {w!r}")
        if sum(self.weights.values()) <= 0:
            raise ValueError(f"CaptionPolicy.weights must have a positive total, got {dict(self.weights)}")
        for name in self.fallback:
            if name not in POSITIVE_SOURCES:
                raise ValueError(f"CaptionPolicy.fallback: unknown caption source '{name}'; "
                                 f"choose from {POSITIVE_SOURCES}")
        object.__setattr__(self, "weights", dict(self.weights))

    @classmethod
    def mix(cls, synthetic_ratio: float, synthetic: str = "synthetic", raw: str = "original") -> CaptionPolicy:
        """A fraction ``synthetic_ratio`` of the steps on the ``synthetic`` source and the rest on
        ``raw`` ("CLIP with Quality Captions": the synthetic/raw mix ratio)."""
        if isinstance(synthetic_ratio, bool) or not isinstance(synthetic_ratio, (int, float)) \
                or not 0.0 <= synthetic_ratio <= 1.0:
            raise ValueError(f"CaptionPolicy.mix: synthetic_ratio must be in [0, 1], got {synthetic_ratio!r}")
        if synthetic == raw:
            raise ValueError(f"CaptionPolicy.mix: synthetic and raw must be different sources, both are '{raw}'")
        return cls(weights={synthetic: float(synthetic_ratio), raw: 1.0 - float(synthetic_ratio)})

    @classmethod
    def parse(cls, spec: str | Mapping[str, float] | CaptionPolicy) -> CaptionPolicy:
        """From ``"original=0.5,rewrites=0.5"``, a {source: weight} dict or a policy."""
        if isinstance(spec, CaptionPolicy):
            return spec
        if isinstance(spec, Mapping):
            return cls(weights=dict(spec))
        weights = {}
        for part in str(spec).split(","):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"caption policy '{spec}': expected SOURCE=WEIGHT, got '{part}'")
            try:
                weights[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"CaptionPolicy.weights['{name.strip()}']: '{value}' is not a number") from None
        return cls(weights=weights)

    def probabilities(self, sources: Mapping[str, list[str]]) -> dict[str, float]:
        """Probability of each source for a sample with these ``sources`` (empty ones removed)."""
        mass = {}
        for name, w in self.weights.items():
            n = len(sources.get(name) or ())
            if w > 0 and n:
                mass[name] = w * (n if self.per_caption else 1)
        if not mass:
            name = next((s for s in self.fallback if sources.get(s)), None)
            return {name: 1.0} if name else {}
        total = sum(mass.values())
        return {k: v / total for k, v in mass.items()}

    def sample(self, item_or_sources: Mapping[str, Any], rng: np.random.Generator) -> tuple[str, str]:
        """``(source, caption)`` drawn for one step from a dataset item or a ``{source: [captions]}``
        dict (one whose keys are all source names). Raises ValueError when the sample has no positive caption."""
        sources = item_or_sources
        if not set(item_or_sources) <= set(CAPTION_SOURCES):  # a dataset item, not a {source: [...]} dict
            sources = caption_sources(item_or_sources)
        probs = self.probabilities(sources)
        if not probs:
            where = f" (key '{item_or_sources['key']}')" if "key" in item_or_sources else ""
            raise ValueError(f"sample{where} has no caption in any source {POSITIVE_SOURCES}")
        names = list(probs)
        k = int(rng.choice(len(names), p=np.array([probs[n] for n in names]))) if len(names) > 1 else 0
        pool = sources[names[k]]
        return names[k], pool[int(rng.integers(len(pool)))]

    def sample_at(self, item: Mapping[str, Any], seed: int, epoch: int, index: int) -> tuple[str, str]:
        """The draw for step ``(epoch, index)``: a pure function of ``(seed, epoch, index)``."""
        return self.sample(item, np.random.default_rng([seed, epoch, index, 7]))


class SourcedCaptions:
    """Wraps a map-style dataset so that each item carries its caption sources.

    ``rewrites`` (a :class:`clipforge.data.rewrites.Rewrites` read by ``load_rewrites``) adds the
    stored rewrites of each sample as its ``rewrites`` source; ``extra`` ({source: [[captions] per
    sample]}) adds other sources (e.g. ``synthetic`` captions from a captioner). The wrapped items
    keep ``captions`` (the original ones); ``caption_sources`` holds the rest.
    """

    def __init__(self, dataset, rewrites=None, extra: Mapping[str, list] | None = None):
        self.dataset, self.rewrites = dataset, rewrites
        self.extra = dict(extra or {})
        for name, per_sample in self.extra.items():
            if name not in CAPTION_SOURCES:
                raise ValueError(f"SourcedCaptions.extra['{name}']: unknown caption source; known: {CAPTION_SOURCES}")
            if len(per_sample) != len(dataset):
                raise ValueError(f"SourcedCaptions.extra['{name}'] has {len(per_sample)} entries for a dataset of "
                                 f"{len(dataset)} samples")
        if rewrites is not None:
            rewrites.check(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        sources = dict(item.get("caption_sources") or {})
        if self.rewrites is not None:
            sources["rewrites"] = self.rewrites.flat(index)
        for name, per_sample in self.extra.items():
            sources[name] = _as_list(per_sample[index], name)
        item["caption_sources"] = sources
        return item

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def caption_records(dataset_or_items) -> list[dict[str, Any]]:
    """``[{"key", "captions", "caption_langs"?, "negatives"?}]`` of every sample, without decoding images
    where the dataset allows it (shard directories keep their metadata in memory; ``shapes`` captions
    come from its generator). Keys default to the sample index as a string."""
    ds = dataset_or_items
    out: list[dict[str, Any]] = []
    if hasattr(ds, "_meta") and hasattr(ds, "_keep") and hasattr(ds, "languages"):  # ShardDataset
        for j in ds._keep:
            meta = ds._meta[int(j)]
            caps, langs = list(meta["captions"]), meta.get("caption_langs")
            if ds.languages is not None and langs:
                keep = [i for i, lang in enumerate(langs) if lang in ds.languages]
                caps, langs = [caps[i] for i in keep], [langs[i] for i in keep]
            rec = {"key": meta["key"], "captions": caps}
            if langs:
                rec["caption_langs"] = list(langs)
            out.append(rec)
        return out
    generator = getattr(ds, "generator", None)
    if generator is not None and hasattr(generator, "sample") and hasattr(ds, "size"):  # ShapesDataset
        for i in range(len(ds)):
            s = generator.sample(i)
            out.append({"key": str(i), "captions": list(s.captions), "negatives": dict(s.negatives),
                        "objects": list(s.objects), "kind": s.kind})
        return out
    for i in range(len(ds)):
        item = ds[i]
        caps = item.get("captions") or []
        rec = {"key": str(item.get("key", i)), "captions": [caps] if isinstance(caps, str) else list(caps)}
        for extra in ("caption_langs", "negatives", "objects"):
            if extra in item:
                rec[extra] = item[extra]
        out.append(rec)
    return out


def dataset_captions(name: str, split: str = "train", languages: list[str] | None = None, size: int | None = None,
                     seed: int = 0) -> list[str]:
    """Every caption of one split of a registered dataset (``a+b`` for several), in sample order,
    read from the metadata without decoding an image; ``languages`` keeps those languages'
    captions (corpora that tag them), ``size``/``seed`` the same subset as ``build_dataset``."""
    from .datasets import build_dataset

    extra = {"languages": list(languages)} if languages else {}
    texts: list[str] = []
    for part in name.split("+"):
        ds = build_dataset(part.strip(), split=split, size=size, seed=seed, **extra)
        texts += [c for rec in caption_records(ds) for c in rec["captions"]]
    return texts
