"""Batches for training: a resumable, deterministic order and a collate that never crashes.

Every random choice (sample order, which caption of a sample, augmentation) is a pure
function of ``(seed, epoch, index)``. Resuming at step ``s`` therefore replays exactly the
batches an uninterrupted run would have seen, whatever the number of workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..images import ImageLoadError
from ..transforms import image_transform, normalize_batch


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields batches of ``(epoch, index)``: a fresh permutation per epoch, drop-last, from ``start_batch`` on."""

    def __init__(self, size: int, batch_size: int, seed: int, start_batch: int = 0, num_batches: int | None = None):
        if size < batch_size:
            raise ValueError(f"dataset of {size} samples is smaller than one batch ({batch_size}); lower batch_size")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_batch, self.num_batches = start_batch, num_batches
        self.batches_per_epoch = size // batch_size

    def __len__(self) -> int:
        return self.num_batches if self.num_batches is not None else 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.start_batch
        end = None if self.num_batches is None else self.start_batch + self.num_batches
        perm_epoch, perm = -1, None
        while end is None or b < end:
            epoch, pos = divmod(b, self.batches_per_epoch)
            if epoch != perm_epoch:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
                perm_epoch = epoch
            chunk = perm[pos * self.batch_size : (pos + 1) * self.batch_size]
            yield [(epoch, int(i)) for i in chunk]
            b += 1


class RankSlices(Sampler[list[tuple[int, int]]]):
    """One process's share of a data-parallel run: every ``group`` consecutive batches of
    ``batches`` (the micro-batches of one optimizer step) form the global batch of the step; rank
    ``r`` of ``world_size`` keeps its contiguous ``r``-th slice of it, cut into ``group`` micro-batches.

    Gathered over the ranks in rank order, the slices are the global batch in the order one
    process would see it, so a run over N processes trains on the same samples at every step as
    a run in one (and the loss terms' gathered features line up with one process's batch)."""

    def __init__(self, batches: Sampler, group: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.batches, self.group, self.rank, self.world_size = batches, group, rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        it = iter(self.batches)
        while True:
            step = [key for _, batch in zip(range(self.group), it) for key in batch]
            if not step:
                return
            share = len(step) // self.world_size
            if share * self.world_size != len(step) or share % self.group:
                raise ValueError(f"a global batch of {len(step)} samples does not split into {self.world_size} ranks "
                                 f"x {self.group} micro-batches of equal size")
            mine, micro = step[self.rank * share:(self.rank + 1) * share], share // self.group
            for k in range(self.group):
                yield mine[k * micro:(k + 1) * micro]


CAPTION_POLICIES = ("random", "first", "longest")


@dataclass
class TrainItems(Dataset):
    """Wraps a dataset: ``ds[(epoch, index)]`` picks one caption and prepares the image."""

    dataset: Dataset
    seed: int
    image_size: int
    augment: bool = False
    negatives: int = 0  # K negative captions per sample (from the dataset's typed ``negatives``)
    negative_types: tuple[str, ...] = ()  # draw negatives only of these types; () = every type
    count_negatives: bool = False  # one counterfactual count caption where the sample states a count
    positives: int = 0  # P positive captions per sample for multi-positive terms
    positive_source: str = "captions"  # "captions" (the sample's captions) or "subcaptions" (DreamLIP)
    teachers: Any = None  # a TeacherStore: stored teacher embeddings of the image and of the drawn caption
    # "random": one of the sample's captions per step; "first": always captions[0], the caption a
    # dataset writes its hard negatives from (a random other wording would let a model tell the
    # negative from the positive by the template alone, not by its meaning)
    caption_policy: str = "random"
    # a clipforge.data.captions.CaptionPolicy over the item's caption sources (original, rewrites,
    # synthetic, short tags); None: one of the item's captions, as caption_policy says
    sources: Any = None
    # SimCLR/SLIP: a transform (image, generator) -> pixels that makes a second random view of every
    # image (view_transform), always applied, also to images already rendered at the model's size
    second_view: Any = None
    # ALIP: a synthetic caption per sample, the item's ``synthetic`` source, else one of its stored rewrites
    synthetic: bool = False
    # HQ-CLIP: short tags per sample, the item's ``short_tags`` source, else keyword_tags(caption)
    short_tags: bool = False
    # CLOC: the item's boxes (normalized xyxy) and one caption per box, up to ``max_regions`` per sample
    # (clipforge.data.regions); collated as region_boxes [B, R, 4], region_texts [B, R, L], region_mask [B, R]
    regions: bool = False
    max_regions: int = 4

    def __post_init__(self):
        if self.caption_policy not in CAPTION_POLICIES:
            raise ValueError(f"caption_policy must be one of {CAPTION_POLICIES}, got '{self.caption_policy}'")
        self.transform = image_transform(self.image_size, is_train=self.augment)

    def __len__(self) -> int:
        return len(self.dataset)

    def _positives(self, captions: list[str], rng) -> list[str]:
        return _draw_positives(captions, self.positives, self.positive_source, rng)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any] | None:
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        try:
            item = self.dataset[index]
            image = item["image"]
            if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.shape[-1] == self.image_size:
                pixels = image  # already rendered at the model's size: normalized batch-wise in collate
            elif self.augment:
                pixels = self.transform(image, generator=torch.Generator().manual_seed(int(rng.integers(2**62))))
            else:
                pixels = self.transform(image)
            if self.second_view is not None:  # its own random stream: the first view's draws stay as they were
                seed = int(np.random.default_rng([self.seed, epoch, index, 2]).integers(2**62))
                view2 = self.second_view(image, generator=torch.Generator().manual_seed(seed))
            captions = item["captions"]
            if isinstance(captions, str):
                captions = [captions]
            if not captions:
                raise ValueError(f"sample {index} has no caption")
            if self.regions:
                boxes, region_captions = _regions(item, index, self.max_regions)
        except (ImageLoadError, ValueError, KeyError, OSError) as e:
            return {"error": f"sample {index}: {e}"}
        if self.caption_policy == "longest":  # Long-CLIP: the long caption (its first sentence is the short one)
            which = max(range(len(captions)), key=lambda i: len(captions[i]))
        else:
            which = 0 if self.caption_policy == "first" else int(rng.integers(len(captions)))
        caption = captions[which]
        if self.sources is not None:
            source, caption = self.sources.sample(item, rng)
        out = {"pixels": pixels, "caption": caption, "index": index}
        if self.second_view is not None:
            out["pixels_view2"] = view2
        if self.synthetic or self.short_tags:
            out.update(second_captions(item, caption, self.synthetic, self.short_tags,
                                       np.random.default_rng([self.seed, epoch, index, 3])))
        if self.regions:
            out["boxes"], out["region_captions"] = boxes, region_captions
        if self.teachers is not None:
            out["teacher_image"], out["teacher_text"] = self.teachers.lookup(index, which)
        if self.positives:
            out["positives"] = self._positives(captions, rng)
        typed = item.get("negatives") or {}
        if self.negatives:
            kinds = sorted(k for k in typed if not self.negative_types or k in self.negative_types)
            pool = [c for kind in kinds for c in typed[kind]]
            pick = rng.permutation(len(pool))[: self.negatives] if pool else []
            out["negatives"] = [pool[int(i)] for i in pick]
        if self.count_negatives:
            counts = typed.get("count") or []
            out["count_negative"] = counts[int(rng.integers(len(counts)))] if counts else None
            out["count_positive"] = same_wording(captions, out["count_negative"]) if counts else None
        return out


def _regions(item: dict, index: int, max_regions: int) -> tuple[torch.Tensor, list[str]]:
    """(boxes [N, 4] float32, N region captions) of a dataset item, checked (clipforge.data.regions)."""
    from ..data.regions import check_regions

    if item.get("boxes") is None or item.get("region_captions") is None:
        raise ValueError(f"sample {index} has no boxes/region_captions; a region loss term needs a dataset with "
                         "regions (shapes, shapes_long, or shards of a region corpus with a 'regions' json field)")
    boxes = check_regions(item["boxes"], item["region_captions"], where=f"sample {index}")
    if len(boxes) > max_regions:
        raise ValueError(f"sample {index} has {len(boxes)} regions, more than max_regions={max_regions}")
    return torch.as_tensor(boxes, dtype=torch.float32), list(item["region_captions"])


def second_captions(item: dict, caption: str, synthetic: bool, short_tags: bool, rng) -> dict[str, str]:
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


def view_transform(image_size: int, scale: tuple[float, float] = (0.5, 1.0), jitter: float = 0.4):
    """The augmentation of the second view (SimCLR/SLIP): a random resized crop covering ``scale``
    of the image and color jitter of strength ``jitter``, no flip (captions here state left/right,
    and the image tower should not learn to ignore it). Milder than SLIP's (crops down to 8 %,
    grayscale, blur), which would cut whole objects out of small rendered scenes."""
    return image_transform(image_size, is_train=True, scale=tuple(scale), jitter=jitter)


def _draw_positives(captions: list[str], k: int, source: str, rng) -> list[str]:
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


def _padded(tokenizer, rows: list[list[str]], k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, K, L] token ids of per-sample caption lists padded to ``k`` (default: the longest) and the [B, K] mask."""
    k = k or max(1, max(len(r) for r in rows))
    padded = [r + [""] * (k - len(r)) for r in rows]
    ids = tokenizer([t for r in padded for t in r]).view(len(rows), k, -1)
    return ids, torch.tensor([[j < len(r) for j in range(k)] for r in rows])


def make_collate(tokenizer: Callable[[list[str]], torch.Tensor], negatives: int | None = None,
                 positives: int | None = None, regions: int | None = None):
    """Stack a batch; per-sample negative (positive) captions are padded to ``negatives``
    (``positives``; default: the batch's largest count) with the mask False on the padding, so
    every micro-batch of a step has the same [B, K] layout; region boxes and captions likewise to
    ``regions`` slots (padding boxes are the whole image, masked out)."""

    def collate(items: list[dict[str, Any] | None]) -> dict[str, Any]:
        good = [it for it in items if it is not None and "error" not in it]
        errors = [it["error"] for it in items if it is not None and "error" in it]
        if not good:
            return {"images": None, "texts": None, "skipped": len(errors), "errors": errors}
        pixels = [it["pixels"] for it in good]
        if pixels[0].dtype == torch.uint8:
            images = normalize_batch(torch.stack(pixels))
        else:
            images = torch.stack(pixels)
        batch = {
            "images": images,
            "texts": tokenizer([it["caption"] for it in good]),
            "indices": torch.tensor([it["index"] for it in good]),
            "skipped": len(errors),
            "errors": errors,
        }
        if "negatives" in good[0]:
            batch["negative_texts"], batch["negative_mask"] = _padded(
                tokenizer, [it["negatives"] for it in good], negatives
            )
        if "positives" in good[0]:
            batch["positive_texts"], batch["positive_mask"] = _padded(
                tokenizer, [it["positives"] for it in good], positives
            )
        if "teacher_image" in good[0]:  # one [B, d_k] tensor per teacher
            for key in ("teacher_image", "teacher_text"):
                batch[key] = [torch.stack(per) for per in zip(*(it[key] for it in good))]
        if "pixels_view2" in good[0]:
            batch["images_view2"] = torch.stack([it["pixels_view2"] for it in good])
        for key in ("synthetic", "short_tags"):  # ALIP's synthetic caption, HQ-CLIP's short tags
            if key in good[0]:
                batch[f"{key}_texts"] = tokenizer([it[key] for it in good])
        if "boxes" in good[0]:
            r = regions or max(1, max(len(it["boxes"]) for it in good))
            boxes = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(len(good), r, 1)
            for row, it in enumerate(good):
                boxes[row, :len(it["boxes"])] = it["boxes"]
            batch["region_boxes"] = boxes
            batch["region_texts"], batch["region_mask"] = _padded(tokenizer, [it["region_captions"] for it in good], r)
        if "count_negative" in good[0]:
            batch["count_negative_texts"] = tokenizer([it["count_negative"] or "" for it in good])
            batch["count_positive_texts"] = tokenizer([it["count_positive"] or "" for it in good])
            batch["count_mask"] = torch.tensor([it["count_negative"] is not None for it in good])
        return batch

    return collate


# entries of a collated batch that describe the whole batch, not one sample each
BATCH_LEVEL = ("skipped", "errors", "skipped_by_reason", "position", "samples")


def trim_batch(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` samples of a collated batch (map-style or streamed): per-sample tensors and
    lists are cut, per-teacher lists cut per teacher, batch-level entries kept (``samples`` set to n)."""
    out = {}
    for key, value in batch.items():
        if key in BATCH_LEVEL:
            out[key] = value
        elif torch.is_tensor(value) or (isinstance(value, list) and not key.startswith("teacher_")):
            out[key] = value[:n]
        elif isinstance(value, list):  # teacher_image / teacher_text: one [B, d_k] tensor per teacher
            out[key] = [t[:n] for t in value]
        else:
            out[key] = value
    if "samples" in out:
        out["samples"] = n
    return out


def train_loader(items: TrainItems, batch_size: int, seed: int, start_batch: int, num_batches: int, tokenizer,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1, accum_steps: int = 1,
                 pin_memory: bool = False) -> DataLoader:
    """Micro-batches of ``batch_size`` samples in the resumable order; with ``world_size > 1``
    this rank's slices of them (:class:`RankSlices`): ``batch_size / world_size`` samples each."""
    sampler = ResumableBatchSampler(len(items), batch_size, seed, start_batch, num_batches)
    if world_size > 1:
        sampler = RankSlices(sampler, accum_steps, rank, world_size)
    return DataLoader(items, batch_sampler=sampler,
                      collate_fn=make_collate(tokenizer, items.negatives or None, items.positives or None,
                                              items.max_regions if items.regions else None),
                      num_workers=num_workers, pin_memory=pin_memory,  # pinned: asynchronous copies to a GPU
                      persistent_workers=False)


def stream_train_loader(data_cfg, image_size: int, batch_size: int, seed: int, tokenizer, caption_policy: str,
                        state: dict | None = None, rank: int = 0, world_size: int = 1):
    """The streaming loader (:mod:`clipforge.data.streaming`) over the train shards of
    ``data_cfg.dataset`` (a built corpus, or ``shards`` with ``data_cfg.root``), endless epochs,
    from ``state`` (a position saved in a checkpoint) if given. ``batch_size`` is this process's
    batch; with ``world_size > 1`` the process reads only rank ``rank``'s shards of each epoch."""
    from ..data.shards import corpus_root
    from ..data.streaming import StreamingLoader, StreamingShards

    if data_cfg.dataset == "shards" and not data_cfg.root:
        raise ValueError("data.dataset=shards needs the shard directory: data.root=DIR")
    root = data_cfg.root if data_cfg.dataset == "shards" else corpus_root(data_cfg.dataset, data_cfg.root)
    dataset = StreamingShards(root, split="train", image_size=image_size, augment=data_cfg.augment,
                              shuffle_buffer=data_cfg.shuffle_buffer, seed=seed, epochs=None,
                              resampled=data_cfg.resampled, caption_policy=caption_policy, rank=rank,
                              world_size=world_size)
    return StreamingLoader(dataset, batch_size, num_workers=data_cfg.num_workers, tokenizer=tokenizer, state=state)


def sum_stream_stats(stats: list[dict]):
    """The :class:`~clipforge.data.streaming.StreamStats` of several processes' streams added up."""
    from ..data.streaming import StreamStats

    total = StreamStats()
    for part in map(StreamStats.from_dict, stats):
        total.samples += part.samples
        total.batches += part.batches
        total.skipped.update(part.skipped)
        for reason, examples in part.examples.items():
            total.examples[reason] = (total.examples.get(reason, []) + examples)[:total.max_examples]
    return total
