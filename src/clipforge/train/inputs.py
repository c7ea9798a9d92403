"""What a loss term can receive from the training program, declared once, from the dataset item to the term.

A loss term names the ``LossInputs.extra`` entries (or token fields) it reads in its ``extra_keys``;
:data:`INPUTS` lists every one the program can produce, each as an :class:`ExtraInput` with the
code that turns a batch into it. An input that comes from the data also carries its
:class:`DataInput`: the :class:`~clipforge.train.data.TrainItems` options that switch it on, the
code that sets them for a run (``configure``), the code that makes its per-sample fields from the
dataset item (``produce``) and the code that stacks and pads them into batch entries (``collate``).
The loop calls :func:`encode_extras` (the model being trained, with gradients) and :func:`encode_ema`
(the EMA copy, without) and stays generic; :mod:`.setup` asks every :class:`DataInput` that a needed
key refers to for its options (:func:`data_options`), :class:`~clipforge.train.data.TrainItems` runs
the producers of the inputs switched on and :func:`~clipforge.train.data.make_collate` their collates.
The set of producible keys (:data:`PRODUCED`), the keys only the map-style loader can deliver
(:data:`FROM_DATASET`), the EMA keys (:data:`EMA_KEYS`) and the data inputs (:data:`DATA_INPUTS`)
are read off the table.

How to add an input (one entry; nothing in data.py, setup.py or loop.py changes):

1. Name its key(s) and write ``encode(model, batch) -> {key: tensor}`` (with gradients; a mask as a
   companion key if per-sample rows are padded).
2. If it comes from the data, write a :class:`DataInput`: ``options`` ({TrainItems keyword: value
   when off}, e.g. ``{"negative_images": 0}``); ``configure(ctx) -> {option: value}`` from the run's
   config (``ctx.cfg``), raising a ValueError that names the fix when the data cannot deliver it;
   ``produce(sample, items) -> {field: value}`` from ``sample.item`` (draw randomness from a stream
   of its own, ``sample.stream(k)`` with an unused ``k``, so that the other inputs' draws stay as
   they were); ``collate(rows, tokenizer, slots) -> {batch entry: tensor}`` over the rows that hold
   its fields (pad per-sample lists to ``slots``, see ``_padded``); ``slots(items)`` if it pads.
3. Add ``ExtraInput(keys, "model", batch_field, True, encode, data=that DataInput)`` to :data:`INPUTS`,
   and, for a new config field, a field of ``DataConfig`` with its comment.
4. Test the producer against the dataset item and the encoder against a per-sample loop
   (tests/train/test_loss_inputs_table.py), and one training run that feeds it to its term.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..transforms import image_transform, normalize_batch

# extra inputs the training program can produce
NEGATIVES, COUNTS, POSITIVES = "negative_text_features", "count_negative_text_features", "positive_text_features"
VIEW2, SYNTHETIC, TAGS = "image_features_view2", "synthetic_text_features", "short_tag_features"
NEGATIVE_IMAGES = "negative_image_features"  # CLIP-IN: edited images whose caption no longer matches
MODALITY = "modality_features"  # Symile: a third view per sample
CLUSTER_LABELS = "cluster_labels"  # MLCD: the offline features' nearest centers
TEACHER_KEYS = ("teacher_image_features", "teacher_text_features")
REGION_KEYS = ("region_features", "region_text_features", "grounded_boxes")  # CLOC, with region_boxes/_mask
TOKEN_KEYS = ("image_tokens", "text_tokens")  # LossInputs fields (with text_mask), from the model's forward
REGION_NEGATIVES, LONG = "region_negative_text_features", "long_text_features"  # FG-CLIP 2's region negatives, long
GA_DMS_KEYS = ("ga_dms_text_features", "ga_dms_mtp_tokens")  # GA-DMS: noise-masked captions, masked-token states
EMA_NEGATIVES = "ema_negative_text_features"


# ------------------------------------------------------------------ the data side


@dataclass(frozen=True)
class Sample:
    """What a producer sees of one training sample at one epoch.

    ``item``: the dataset's item; ``captions``: its captions; ``caption``: the step's caption and
    ``which`` its position in ``captions`` (as the caption policy drew it); ``rng``: the sample's
    main random stream, shared by the producers that used it before the table said otherwise
    (positives, negatives, count captions draw from it in table order); ``pixel_seed``: the seed of
    the image's augmentation (None without augmentation), so an edited copy can be augmented alike."""

    item: Mapping[str, Any]
    index: int
    epoch: int
    seed: int
    captions: list[str]
    caption: str
    which: int
    rng: np.random.Generator
    pixel_seed: int | None = None

    def stream(self, k: int) -> np.random.Generator:
        """A random stream of the sample's own for producer number ``k`` (a pure function of seed, epoch, index)."""
        return np.random.default_rng([self.seed, self.epoch, self.index, k])


@dataclass(frozen=True)
class DataContext:
    """What ``DataInput.configure`` sees of a run: its config, the keys its loss terms read, the model's
    image size, the run directory, the training dataset, the loss terms (for options of theirs) and the
    second-view transform factory (``setup.view_transform``)."""

    cfg: Any
    needs: frozenset
    image_size: int
    out_dir: Path
    dataset: Any = None
    terms: tuple = ()
    view_transform: Callable | None = None


def _is_set(value: Any) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    return True


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one entry, possibly shared by several keys
class DataInput:
    """The data side of one or more loss inputs.

    ``options``: the TrainItems keyword arguments it takes, with their values when it is off; it is on
    when one of ``switches`` (default: the first option) is set. ``configure(ctx) -> options`` for a
    run; ``produce(sample, items) -> {field: value}`` per sample (``items`` is the TrainItems, its options
    are attributes); ``collate(rows, tokenizer, slots) -> {entry: tensor}`` over the batch's rows when they
    hold one of its ``fields``; ``slots(items)``: the padded width of its per-sample lists (None: the batch's
    longest); ``skips``: a ValueError/KeyError/OSError of ``produce`` skips the sample (as a broken image
    does) instead of stopping the run."""

    name: str
    fields: tuple[str, ...]
    options: Mapping[str, Any]
    configure: Callable[[DataContext], dict]
    produce: Callable[[Sample, Any], dict]
    collate: Callable[[list[dict], Callable, int | None], dict]
    slots: Callable[[Any], int | None] | None = None
    skips: bool = False
    switches: tuple[str, ...] = ()

    def is_on(self, items) -> bool:
        return any(_is_set(getattr(items, name)) for name in (self.switches or tuple(self.options)[:1]))


def _padded(tokenizer, rows: list[list[str]], k: int | None) -> tuple[Tensor, Tensor]:
    """[B, K, L] token ids of per-sample caption lists padded to ``k`` (default: the longest) and the [B, K] mask."""
    k = k or max(1, max(len(r) for r in rows))
    padded = [r + [""] * (k - len(r)) for r in rows]
    ids = tokenizer([t for r in padded for t in r]).view(len(rows), k, -1)
    return ids, torch.tensor([[j < len(r) for j in range(k)] for r in rows])


def view_transform(image_size: int, scale: tuple[float, float] = (0.5, 1.0), jitter: float = 0.4):
    """The augmentation of the second view (SimCLR/SLIP): a random resized crop covering ``scale``
    of the image and color jitter of strength ``jitter``, no flip (captions here state left/right,
    and the image tower should not learn to ignore it). Milder than SLIP's (crops down to 8 %,
    grayscale, blur), which would cut whole objects out of small rendered scenes."""
    return image_transform(image_size, is_train=True, scale=tuple(scale), jitter=jitter)


def second_captions(item: Mapping, caption: str, synthetic: bool, short_tags: bool, rng) -> dict[str, str]:
    """A sample's second caption(s) besides the step's ``caption``, for ALIP and HQ-CLIP.

    ``synthetic``: one of the item's ``synthetic`` captions (a captioner's output), else one of its
    stored ``rewrites`` (data.rewrites, e.g. the rule rewriter), drawn uniformly with ``rng`` and
    other than ``caption`` where possible; a sample with neither pairs its caption with itself.
    ``short_tags``: one of the item's ``short_tags``, else :func:`clipforge.data.tags.keyword_tags`
    of ``caption``."""
    from ..data.captions import caption_sources
    from ..data.tags import keyword_tags

    sources, out = caption_sources(item), {}
    if synthetic:
        pool = sources["synthetic"] or sources["rewrites"]
        pool = [c for c in pool if c != caption] or pool or [caption]
        out["synthetic"] = pool[int(rng.integers(len(pool)))]
    if short_tags:
        tags = sources["short_tags"]
        out["short_tags"] = tags[int(rng.integers(len(tags)))] if tags else keyword_tags(caption)
    return out


def draw_positives(captions: list[str], k: int, source: str, rng) -> list[str]:
    """Up to ``k`` distinct positive texts: the sample's captions, or (DreamLIP) sub-captions,
    the sentences of its longest caption, or (Long-CLIP) the first sentence of its longest caption
    alone ("first_sentence", the short summary caption); never none, since every sample has a caption."""
    if source == "first_sentence":
        from ..data.long_captions import short_and_long

        return [short_and_long(max(captions, key=len))[0]]
    if source == "subcaptions":
        from ..data.long_captions import sample_subcaptions

        return sample_subcaptions(max(captions, key=len), k, rng) or [captions[0]]
    return [captions[int(i)] for i in rng.permutation(len(captions))[:k]]


def same_wording(captions: list[str], counterfactual: str) -> str:
    """The caption that ``counterfactual`` was written from: the one with as many words that
    differs from it in the fewest positions (the number, and the noun's plural). The counting
    loss contrasts this pair, so the two differ only in the count, as in Paiss et al."""
    words = counterfactual.split()

    def distance(caption: str) -> float:
        other = caption.split()
        return sum(a != b for a, b in zip(words, other)) if len(other) == len(words) else float("inf")

    return min(captions, key=distance)


def item_regions(item: Mapping, index: int, max_regions: int) -> tuple[Tensor, list[str]]:
    """(boxes [N, 4] float32, N region captions) of a dataset item, checked (clipforge.data.regions)."""
    from ..data.regions import check_regions

    if item.get("boxes") is None or item.get("region_captions") is None:
        raise ValueError(f"sample {index} has no boxes/region_captions; a region loss term needs a dataset with "
                         "regions (shapes, shapes_long, or shards of a region corpus with a 'regions' json field)")
    boxes = check_regions(item["boxes"], item["region_captions"], where=f"sample {index}")
    if len(boxes) > max_regions:
        raise ValueError(f"sample {index} has {len(boxes)} regions, more than max_regions={max_regions}")
    return torch.as_tensor(boxes, dtype=torch.float32), list(item["region_captions"])


def _tokens(key: str, entry: str):
    """A collate that tokenizes one caption per sample from field ``key`` into batch entry ``entry``."""
    def collate(rows, tokenizer, slots):
        return {entry: tokenizer([r[key] for r in rows])} if key in rows[0] else {}
    return collate


# --- a second view (SimCLR/SLIP)
def _configure_view2(ctx: DataContext) -> dict:
    make = ctx.view_transform or view_transform
    return {"second_view": make(ctx.image_size, ctx.cfg.data.view_scale, ctx.cfg.data.view_jitter)}


def _produce_view2(s: Sample, items) -> dict:
    seed = int(s.stream(2).integers(2**62))  # its own stream: the first view's draws stay as they were
    return {"pixels_view2": items.second_view(s.item["image"], generator=torch.Generator().manual_seed(seed))}


VIEW2_DATA = DataInput("view2", ("pixels_view2",), {"second_view": None}, _configure_view2, _produce_view2,
                       lambda rows, tok, slots: {"images_view2": torch.stack([r["pixels_view2"] for r in rows])},
                       skips=True)


# --- ALIP's synthetic caption and HQ-CLIP's short tags
def _configure_second_captions(ctx: DataContext) -> dict:
    if SYNTHETIC in ctx.needs and not ctx.cfg.data.rewrites and ctx.dataset is not None:
        from ..data.captions import caption_sources

        if not caption_sources(ctx.dataset[0])["synthetic"]:
            raise ValueError(f"the loss terms {sorted(ctx.cfg.loss)} pair each caption with a synthetic caption "
                             f"(ALIP) and data.dataset={ctx.cfg.data.dataset} has none: set data.rewrites=rule (a "
                             "stored rule rewrite of the sample's captions stands in for it) or a sidecar file of "
                             "rewrites")
    return {"synthetic": SYNTHETIC in ctx.needs, "short_tags": TAGS in ctx.needs}


def _produce_second_captions(s: Sample, items) -> dict:
    return second_captions(s.item, s.caption, items.synthetic, items.short_tags, s.stream(3))


def _collate_second_captions(rows, tokenizer, slots) -> dict:
    return {**_tokens("synthetic", "synthetic_texts")(rows, tokenizer, slots),
            **_tokens("short_tags", "short_tags_texts")(rows, tokenizer, slots)}


SECOND_CAPTIONS_DATA = DataInput("second_captions", ("synthetic", "short_tags"),
                                 {"synthetic": False, "short_tags": False},
                                 _configure_second_captions, _produce_second_captions, _collate_second_captions,
                                 switches=("synthetic", "short_tags"))


# --- stored teacher embeddings (MobileCLIP-style distillation)
def _configure_teachers(ctx: DataContext) -> dict:
    from .teachers import load_teacher_store

    cfg = ctx.cfg
    if cfg.data.reinforced:  # MobileCLIP's reinforced dataset: stored views, captions and teachers (train/reinforce.py)
        from .reinforce import load_reinforced

        store = load_reinforced(cfg.data.reinforced)
        store.check_matches(cfg.data.dataset, len(ctx.dataset), cfg.data.seed, ctx.image_size)
        return {"teachers": store}
    if not cfg.data.teachers:
        raise ValueError(f"the loss terms {sorted(cfg.loss)} read stored teacher embeddings: name the frozen "
                         "teacher models with data.teachers=[<checkpoint or run directory>, ...]")
    if cfg.data.augment:
        raise ValueError("teacher embeddings are stored for the un-augmented training images; set data.augment=false")
    return {"teachers": load_teacher_store(cfg.data.teachers, cfg.data.dataset, cfg.data.train_size, cfg.data.seed,
                                           cfg.data.teacher_cache or ctx.out_dir / "teacher_cache")}


def _produce_teachers(s: Sample, items) -> dict:
    from .reinforce import ReinforcedStore

    if isinstance(items.teachers, ReinforcedStore):  # a stored view and caption replace the sample's own
        return items.teachers.produce(s)
    image, text = items.teachers.lookup(s.index, s.which)
    return {"teacher_image": image, "teacher_text": text}


def _collate_teachers(rows, tokenizer, slots) -> dict:  # one [B, d_k] tensor per teacher
    return {key: [torch.stack(per) for per in zip(*(r[key] for r in rows))]
            for key in ("teacher_image", "teacher_text")}


TEACHERS_DATA = DataInput("teachers", ("teacher_image", "teacher_text"), {"teachers": None}, _configure_teachers,
                          _produce_teachers, _collate_teachers)


# --- positive captions (multi-positive terms, DreamLIP, Long-CLIP)
POSITIVES_DATA = DataInput(
    "positives", ("positives",), {"positives": 0, "positive_source": "captions"},
    lambda ctx: {"positives": ctx.cfg.data.positives, "positive_source": ctx.cfg.data.positive_source},
    lambda s, items: {"positives": draw_positives(s.captions, items.positives, items.positive_source, s.rng)},
    lambda rows, tok, slots: dict(zip(("positive_texts", "positive_mask"), _padded(tok, [r["positives"] for r in rows],
                                                                                   slots))),
    slots=lambda items: items.positives or None)


# --- hard negative captions (NegCLIP, DeGLA) and HQ-CLIP's negative descriptions
def _produce_negatives(s: Sample, items) -> dict:
    from ..data.captions import source_negatives

    typed = source_negatives(s.item)  # its typed negatives, plus its negative descriptions (HQ-CLIP) as "description"
    kinds = sorted(k for k in typed if not items.negative_types or k in items.negative_types)
    pool = [c for kind in kinds for c in typed[kind]]
    pick = s.rng.permutation(len(pool))[: items.negatives] if pool else []
    return {"negatives": [pool[int(i)] for i in pick]}


NEGATIVES_DATA = DataInput(
    "negatives", ("negatives",), {"negatives": 0, "negative_types": ()},
    lambda ctx: {"negatives": ctx.cfg.data.hard_negatives, "negative_types": tuple(ctx.cfg.data.negative_types)},
    _produce_negatives,
    lambda rows, tok, slots: dict(zip(("negative_texts", "negative_mask"), _padded(tok, [r["negatives"] for r in rows],
                                                                                   slots))),
    slots=lambda items: items.negatives or None)


# --- count counterfactuals (Paiss et al.)
def _produce_counts(s: Sample, items) -> dict:
    counts = (s.item.get("negatives") or {}).get("count") or []
    negative = counts[int(s.rng.integers(len(counts)))] if counts else None
    return {"count_negative": negative, "count_positive": same_wording(s.captions, negative) if counts else None}


def _collate_counts(rows, tokenizer, slots) -> dict:
    return {"count_negative_texts": tokenizer([r["count_negative"] or "" for r in rows]),
            "count_positive_texts": tokenizer([r["count_positive"] or "" for r in rows]),
            "count_mask": torch.tensor([r["count_negative"] is not None for r in rows])}


COUNTS_DATA = DataInput("counts", ("count_negative", "count_positive"), {"count_negatives": False},
                        lambda ctx: {"count_negatives": True}, _produce_counts, _collate_counts)


# --- regions and their captions (CLOC)
def _produce_regions(s: Sample, items) -> dict:
    boxes, captions = item_regions(s.item, s.index, items.max_regions)
    return {"boxes": boxes, "region_captions": captions}


def _collate_regions(rows, tokenizer, slots) -> dict:
    r = slots or max(1, max(len(row["boxes"]) for row in rows))
    boxes = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(len(rows), r, 1)  # padding: the whole image, masked out
    for i, row in enumerate(rows):
        boxes[i, :len(row["boxes"])] = row["boxes"]
    texts, mask = _padded(tokenizer, [row["region_captions"] for row in rows], r)
    return {"region_boxes": boxes, "region_texts": texts, "region_mask": mask}


REGIONS_DATA = DataInput("regions", ("boxes", "region_captions"), {"regions": False, "max_regions": 4},
                         lambda ctx: {"regions": True}, _produce_regions, _collate_regions,
                         slots=lambda items: items.max_regions if items.regions else None, skips=True)


# --- FG-CLIP 2's region hard negatives: K attribute-changed captions per region caption
def _produce_region_negatives(s: Sample, items) -> dict:
    from ..data.regions import region_negative_captions

    _, captions = item_regions(s.item, s.index, items.max_regions)
    return {"region_negatives": region_negative_captions(captions, items.region_negatives, s.stream(7))}


def _collate_region_negatives(rows, tokenizer, slots) -> dict:
    """[B, R, K, L] ids and [B, R, K] mask: R region slots as the regions' collate pads them, K negatives each."""
    r, k = slots or (None, None)
    r = r or max(1, max(len(row["region_negatives"]) for row in rows))
    k = k or max(1, max(len(n) for row in rows for n in row["region_negatives"]))
    flat = [n for row in rows for n in row["region_negatives"] + [[]] * (r - len(row["region_negatives"]))]
    ids, mask = _padded(tokenizer, flat, k)
    return {"region_negative_texts": ids.view(len(rows), r, k, -1), "region_negative_mask": mask.view(len(rows), r, k)}


REGION_NEGATIVES_DATA = DataInput(
    "region_negatives", ("region_negatives",), {"region_negatives": 0},
    lambda ctx: {"regions": True, "region_negatives": ctx.cfg.data.hard_negatives},
    _produce_region_negatives, _collate_region_negatives,
    slots=lambda items: (items.max_regions, items.region_negatives) if items.region_negatives else None, skips=True)


# --- FG-CLIP 2's long-caption branch: the sample's longest caption beside the step's one
LONG_CAPTION_DATA = DataInput("long_caption", ("long_caption",), {"long_caption": False},
                              lambda ctx: {"long_caption": True},
                              lambda s, items: {"long_caption": max(s.captions, key=len)},
                              _tokens("long_caption", "long_texts"))


# --- GA-DMS: the step's caption ids once more, which the training program re-encodes masked, with the term's
# (noise_ratio, mask_ratio) per row
def _configure_token_masking(ctx: DataContext) -> dict:
    ratios = {tuple(t.masking_ratios) for t in ctx.terms if getattr(t, "masking_ratios", None) is not None}
    if len(ratios) > 1:
        raise ValueError(f"the loss terms ask for different token-masking ratios {sorted(ratios)}; give every ga_dms "
                         "term the same noise_ratio and mask_ratio")
    return {"token_masking": True, "masking_ratios": ratios.pop() if ratios else TOKEN_MASKING_RATIOS}


def _collate_token_masking(rows, tokenizer, slots) -> dict:
    if "mask_caption" not in rows[0]:
        return {}
    return {"mask_texts": tokenizer([r["mask_caption"] for r in rows]),
            "mask_ratios": torch.tensor([r["masking_ratios"] for r in rows], dtype=torch.float64)}


TOKEN_MASKING_RATIOS = (0.2, 0.15)  # (noise, mask) when no term states them: ga_dms's defaults
TOKEN_MASKING_DATA = DataInput("token_masking", ("mask_caption",),
                               {"token_masking": False, "masking_ratios": TOKEN_MASKING_RATIOS},
                               _configure_token_masking,
                               lambda s, items: {"mask_caption": s.caption,
                                                 "masking_ratios": tuple(items.masking_ratios)},
                               _collate_token_masking)


# --- negative images (CLIP-IN): edited copies of the image whose caption no longer matches
def _configure_negative_images(ctx: DataContext) -> dict:
    k = ctx.cfg.data.negative_images
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"data.negative_images must be an integer >= 1 (edited images per sample), got {k!r}")
    if ctx.dataset is not None and ctx.dataset[0].get("objects") is None:
        raise ValueError(f"the loss terms {sorted(ctx.cfg.loss)} read negative images, which are re-rendered from a "
                         f"scene's object list, and data.dataset={ctx.cfg.data.dataset} has none: train them on "
                         "data.dataset=shapes (or shapes_long), or drop hard_negative's negative_images option")
    return {"negative_images": k}


def _produce_negative_images(s: Sample, items) -> dict:
    from ..data.shapes import negative_images

    if s.item.get("objects") is None:
        raise ValueError(f"sample {s.index} has no scene (objects) to edit into a negative image")
    size = int(s.item["image"].shape[-1])
    edits = negative_images(s.item["objects"], s.item["background"], size, items.negative_images, s.stream(4))
    # prepared like the sample's image, with the same augmentation draw when augmenting
    pixels = [items.prepare(torch.from_numpy(image).permute(2, 0, 1).contiguous(), s.pixel_seed) for image, _ in edits]
    return {"negative_pixels": pixels, "negative_edits": [edit for _, edit in edits]}


def _collate_negative_images(rows, tokenizer, slots) -> dict:
    k = slots or max(1, max(len(r["negative_pixels"]) for r in rows))
    blank = torch.zeros_like(rows[0]["negative_pixels"][0])
    stacked = torch.stack([torch.stack(r["negative_pixels"] + [blank] * (k - len(r["negative_pixels"]))) for r in rows])
    images = normalize_batch(stacked.flatten(0, 1)).view(stacked.shape) if stacked.dtype == torch.uint8 else stacked
    mask = torch.tensor([[j < len(r["negative_pixels"]) for j in range(k)] for r in rows])
    return {"negative_images": images, "negative_image_mask": mask}


NEGATIVE_IMAGES_DATA = DataInput("negative_images", ("negative_pixels", "negative_edits"), {"negative_images": 0},
                                 _configure_negative_images, _produce_negative_images, _collate_negative_images,
                                 slots=lambda items: items.negative_images or None)


# --- Symile's third modality: the sample's name in another language, tagged with that language
def _configure_third_view(ctx: DataContext) -> dict:
    if ctx.dataset is not None and not ctx.dataset[0].get("caption_langs"):
        raise ValueError(f"the loss terms {sorted(ctx.cfg.loss)} read a third modality (Symile), which the training "
                         "program makes from a sample's caption in another language, tagged with it; "
                         f"data.dataset={ctx.cfg.data.dataset} tags no caption languages: train on data.dataset=emoji "
                         "(clipforge data build emoji), whose names come in 14 languages")
    return {"third_view": True}


def language_tagged(captions: list[str], langs: list[str], caption: str, rng) -> str:
    """Symile's third view of a sample: one of its captions in a language other than that of the step's
    ``caption``, drawn with ``rng`` and tagged as ``"[lang] caption"``; a sample with one language gives
    another of its captions, or the step's caption, tagged."""
    own = langs[captions.index(caption)] if caption in captions else None
    pool = [j for j, lang in enumerate(langs) if lang != own] or \
        [j for j, c in enumerate(captions) if c != caption] or list(range(len(captions)))
    j = pool[int(rng.integers(len(pool)))]
    return f"[{langs[j]}] {captions[j]}"


def _produce_third_view(s: Sample, items) -> dict:
    langs = s.item.get("caption_langs")
    if not langs or len(langs) != len(s.captions):
        raise ValueError(f"sample {s.index} has no language for each caption (caption_langs), which Symile's "
                         "third view needs")
    return {"third_view": language_tagged(s.captions, list(langs), s.caption, s.stream(5))}


THIRD_VIEW_DATA = DataInput("third_view", ("third_view",), {"third_view": False}, _configure_third_view,
                            _produce_third_view, _tokens("third_view", "third_view_texts"))


# --- MLCD's multi-labels from the offline features of a cluster file (clipforge data cluster)
def _configure_clusters(ctx: DataContext) -> dict:
    from .clusters import data_identity, load_cluster_labels

    terms = [t for t in ctx.terms if getattr(t, "cluster_file", None)]
    if len({(t.cluster_file, t.cfg.num_labels) for t in terms}) != 1:
        raise ValueError("the loss terms read cluster labels of more than one cluster file or label count (or of "
                         "none): give every mlcd term the same clusters and num_labels options")
    _, labels = load_cluster_labels(terms[0].cluster_file, terms[0].cfg.num_labels,
                                    data_identity(ctx.cfg.data, ctx.dataset))
    return {"cluster_labels": labels}


CLUSTERS_DATA = DataInput("clusters", ("cluster_labels",), {"cluster_labels": None}, _configure_clusters,
                          lambda s, items: {"cluster_labels": items.cluster_labels[s.index]},
                          lambda rows, tok, slots: {"cluster_labels": torch.stack([r["cluster_labels"] for r in rows])})


# ------------------------------------------------------------------ the loss side


def _per_sample(encode_text, ids: Tensor) -> Tensor:
    """[B, K, L] token ids (per-sample negatives or positives) -> [B, K, d] features."""
    return encode_text(ids.reshape(-1, ids.shape[-1])).float().view(ids.shape[0], ids.shape[1], -1)


def _regions(model: nn.Module, batch: dict) -> dict:
    """The region captions' text embeddings with the boxes and mask (every region term) and, for a model with
    a region head (CLOC), the region embeddings of the boxes (the head over one pass of the image tower) and
    the boxes the head grounds the captions to. A term that reads those on a model without a region head is
    refused at start-up (train/setup.py, check_model_parts)."""
    texts = _per_sample(model.encode_text, batch["region_texts"])
    out = {"region_text_features": texts, "region_boxes": batch["region_boxes"], "region_mask": batch["region_mask"]}
    if getattr(model, "region_head", None) is not None:
        regions, grounded = model.region_outputs(batch["images"], batch["region_boxes"], texts)
        out.update(region_features=regions.float(), grounded_boxes=grounded.float())
    return out


def _region_negatives(model: nn.Module, batch: dict) -> dict:
    """[B, R, K, d] embeddings of each region caption's K negatives (FG-CLIP 2), with their [B, R, K] mask."""
    ids = batch["region_negative_texts"]
    feats = model.encode_text(ids.reshape(-1, ids.shape[-1])).float().view(*ids.shape[:3], -1)
    return {REGION_NEGATIVES: feats, "region_negative_mask": batch["region_negative_mask"]}


def _ga_dms(model: nn.Module, batch: dict) -> dict:
    """GA-DMS's two re-encodings of the step's captions (clipforge.losses.ga_dms.dual_masks): without the
    tokens of lowest gradient-attention score (noise), and with the highest-scoring ones masked (for
    masked-token prediction). The scores come from the text tower's last-layer attention maps and the
    gradient of each caption's similarity to its image with respect to them (losses.ga_dms.ga_scores), in a
    pass of their own whose graph is dropped; the ratios are the ga_dms term's (``mask_ratios`` rows)."""
    from ..losses.ga_dms import content_mask, dual_masks, ga_scores, similarity_gradient

    ids, cfg = batch["mask_texts"], model.text.cfg
    with torch.no_grad():
        image = model.encode_image(batch["images"]).float()
    with torch.enable_grad():
        text, attention = model.encode_text_attention(ids)
        grad = similarity_gradient(image, text.float(), attention)
    eot = model.text.eot_index(ids)
    content = content_mask(ids, eot, cfg.pad_token_id)
    scores = ga_scores(attention.detach(), grad, eot, content)
    noise_ratio, mask_ratio = (float(r) for r in batch["mask_ratios"][0])
    denoised, masked, targets = dual_masks(ids, scores, content, cfg.pad_token_id, noise_ratio, mask_ratio)
    _, mtp_tokens, _ = model.encode_text_tokens(masked)
    return {"ga_dms_text_features": model.encode_text(denoised).float(), "ga_dms_mtp_tokens": mtp_tokens.float(),
            "ga_dms_mtp_targets": targets}


def _negative_image_features(model: nn.Module, batch: dict) -> dict:
    """[B, K', 3, H, W] edited images -> [B, K', d] features (and their mask)."""
    images = batch["negative_images"]
    feats = model.encode_image(images.flatten(0, 1)).float().view(images.shape[0], images.shape[1], -1)
    return {NEGATIVE_IMAGES: feats, "negative_image_mask": batch["negative_image_mask"]}


def _ema_pair(model: nn.Module, batch: dict) -> dict:
    out = model(batch["images"], batch["texts"])
    return {"ema_image_features": out["image_features"].float(), "ema_text_features": out["text_features"].float()}


@dataclass(frozen=True)
class ExtraInput:
    """One input a loss term can ask for.

    ``keys``: the names a term puts in its ``extra_keys`` (the encoder may add companions, e.g. a mask).
    ``source``: who makes it: ``"model"`` (the model being trained, with gradients, or its own forward
    when ``encode`` is None), ``"ema"`` (the EMA copy, no gradients) or ``"stored"`` (embeddings that
    come with the batch as they are). ``batch_field``: the batch entry the encoder reads; the input
    exists for a batch that holds it. ``map_style_only``: only the map-style loader delivers that field
    (a streamed batch holds images and captions). ``encode(model, batch) -> {key: tensor}``.
    ``data``: the :class:`DataInput` that puts ``batch_field`` in the batch (None: the images and
    captions every batch holds, or the model's forward).
    """

    keys: tuple[str, ...]
    source: Literal["model", "ema", "stored"]
    batch_field: str | None
    map_style_only: bool
    encode: Callable[[nn.Module, dict], dict] | None = None
    data: DataInput | None = field(default=None, compare=False)


# Producers drawing from a sample's main stream (positives, negatives, count captions) draw in the order their
# DataInputs first appear here: keep it, or the samples' draws change.
INPUTS: tuple[ExtraInput, ...] = (
    ExtraInput((VIEW2,), "model", "images_view2", True,
               lambda m, b: {VIEW2: m.encode_image(b["images_view2"]).float()}, VIEW2_DATA),
    ExtraInput((SYNTHETIC,), "model", "synthetic_texts", True,
               lambda m, b: {SYNTHETIC: m.encode_text(b["synthetic_texts"]).float()}, SECOND_CAPTIONS_DATA),
    ExtraInput((TAGS,), "model", "short_tags_texts", True,
               lambda m, b: {TAGS: m.encode_text(b["short_tags_texts"]).float()}, SECOND_CAPTIONS_DATA),
    ExtraInput(TEACHER_KEYS, "stored", "teacher_image", True,  # lists of [B, d_k], one per teacher
               lambda m, b: dict(zip(TEACHER_KEYS, (b["teacher_image"], b["teacher_text"]))), TEACHERS_DATA),
    ExtraInput((POSITIVES,), "model", "positive_texts", True,
               lambda m, b: {POSITIVES: _per_sample(m.encode_text, b["positive_texts"]),
                             "positive_text_mask": b["positive_mask"]}, POSITIVES_DATA),
    ExtraInput((NEGATIVES,), "model", "negative_texts", True,
               lambda m, b: {NEGATIVES: _per_sample(m.encode_text, b["negative_texts"]),
                             "negative_text_mask": b["negative_mask"]}, NEGATIVES_DATA),
    ExtraInput((COUNTS,), "model", "count_negative_texts", True,
               lambda m, b: {COUNTS: m.encode_text(b["count_negative_texts"]).float(),
                             "count_positive_text_features": m.encode_text(b["count_positive_texts"]).float(),
                             "count_mask": b["count_mask"]}, COUNTS_DATA),
    ExtraInput(REGION_KEYS, "model", "region_boxes", True, _regions, REGIONS_DATA),
    ExtraInput((MODALITY,), "model", "third_view_texts", True,  # a list of further modalities, here one
               lambda m, b: {MODALITY: [m.encode_text(b["third_view_texts"]).float()]}, THIRD_VIEW_DATA),
    ExtraInput((CLUSTER_LABELS,), "stored", "cluster_labels", True,  # [B, l] center indices
               lambda m, b: {CLUSTER_LABELS: b["cluster_labels"]}, CLUSTERS_DATA),
    ExtraInput((NEGATIVE_IMAGES,), "model", "negative_images", True, _negative_image_features, NEGATIVE_IMAGES_DATA),
    ExtraInput((REGION_NEGATIVES,), "model", "region_negative_texts", True, _region_negatives, REGION_NEGATIVES_DATA),
    ExtraInput((LONG,), "model", "long_texts", True, lambda m, b: {LONG: m.encode_text(b["long_texts"]).float()},
               LONG_CAPTION_DATA),
    ExtraInput(GA_DMS_KEYS, "model", "mask_texts", True, _ga_dms, TOKEN_MASKING_DATA),
    ExtraInput(TOKEN_KEYS, "model", None, False),  # the model's forward with return_tokens (setup.token_outputs)
    ExtraInput(("ema_image_features", "ema_text_features"), "ema", "images", False, lambda m, b: _ema_pair(m, b)),
    ExtraInput((EMA_NEGATIVES,), "ema", "negative_texts", True,
               lambda m, b: {EMA_NEGATIVES: _per_sample(m.encode_text, b["negative_texts"])}, NEGATIVES_DATA),
)

PRODUCED = frozenset(k for i in INPUTS for k in i.keys)
FROM_DATASET = frozenset(k for i in INPUTS if i.map_style_only for k in i.keys)
EMA_KEYS = tuple(k for i in INPUTS if i.source == "ema" for k in i.keys)
DATA_INPUTS: tuple[DataInput, ...] = tuple(dict.fromkeys(i.data for i in INPUTS if i.data is not None))


def needed_data(needs: set) -> list[DataInput]:
    """The data inputs that the keys ``needs`` (the loss terms' extra_keys) call for, in table order."""
    wanted = {i.data for i in INPUTS if i.data is not None and needs & set(i.keys)}
    return [d for d in DATA_INPUTS if d in wanted]


def data_options(ctx: DataContext) -> dict:
    """The TrainItems options of every data input the run's loss terms read (``ctx.needs``)."""
    options: dict = {}
    for d in needed_data(set(ctx.needs)):
        options.update(d.configure(ctx))
    return options


def encode_extras(model: nn.Module, batch: dict) -> dict:
    """The extra inputs of ``batch`` the model being trained encodes (with gradients), and the stored
    embeddings that came with it."""
    extra: dict = {}
    for inp in INPUTS:
        if inp.source != "ema" and inp.encode is not None and inp.batch_field in batch:
            extra.update(inp.encode(model, batch))
    return extra


@torch.no_grad()
def encode_ema(ema, batch: dict) -> dict:
    """The EMA teacher's embeddings of the batch's images, captions and negative captions (no gradients)."""
    if ema is None:
        return {}
    extra: dict = {}
    for inp in INPUTS:
        if inp.source == "ema" and inp.batch_field in batch:
            extra.update(inp.encode(ema.model, batch))
    return extra
