"""Batches for training: a resumable, deterministic order and a collate that never crashes.

Every random choice (sample order, which caption of a sample, augmentation) is a pure
function of ``(seed, epoch, index)``. Resuming at step ``s`` therefore replays exactly the
batches an uninterrupted run would have seen, whatever the number of workers.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..images import ImageLoadError
from ..transforms import image_transform, normalize_batch
from .inputs import DATA_INPUTS, Sample, same_wording, second_captions, view_transform  # noqa: F401


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


class TrainItems(Dataset):
    """Wraps a dataset: ``ds[(epoch, index)]`` picks one caption, prepares the image and adds the
    per-sample fields of the loss inputs switched on.

    ``caption_policy``: "random": one of the sample's captions per step; "first": always captions[0],
    the caption a dataset writes its hard negatives from (a random other wording would let a model
    tell the negative from the positive by the template alone, not by its meaning); "longest": the
    longest (Long-CLIP). ``sources``: a clipforge.data.captions.CaptionPolicy over the item's caption
    sources (original, rewrites, synthetic, short tags); None: one of the item's captions, as
    caption_policy says.

    Every other keyword is an option of a data input of :data:`clipforge.train.inputs.DATA_INPUTS`
    (its value when off is the default), e.g. ``negatives=K`` (K hard-negative captions per sample),
    ``negative_types``, ``count_negatives``, ``positives=P`` with ``positive_source``, ``teachers``
    (a TeacherStore), ``second_view`` (a transform (image, generator) -> pixels), ``synthetic``,
    ``short_tags``, ``regions`` with ``max_regions``, ``negative_images=K'``. Each input switched on
    adds its fields to the item (:class:`clipforge.train.inputs.DataInput`).
    """

    def __init__(self, dataset: Dataset, seed: int, image_size: int, augment: bool = False,
                 caption_policy: str = "random", sources: Any = None, **options: Any):
        if caption_policy not in CAPTION_POLICIES:
            raise ValueError(f"caption_policy must be one of {CAPTION_POLICIES}, got '{caption_policy}'")
        known = {name: default for d in DATA_INPUTS for name, default in d.options.items()}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(f"TrainItems has no option(s) {unknown}; the data inputs take {sorted(known)}")
        self.dataset, self.seed, self.image_size, self.augment = dataset, seed, image_size, augment
        self.caption_policy, self.sources = caption_policy, sources
        for name, default in known.items():
            setattr(self, name, options.get(name, default))
        self.inputs = [d for d in DATA_INPUTS if d.is_on(self)]  # in table order
        self.transform = image_transform(self.image_size, is_train=self.augment)

    def __len__(self) -> int:
        return len(self.dataset)

    def prepare(self, image: Any, pixel_seed: int | None) -> torch.Tensor:
        """An image as the model's input: kept as uint8 when rendered at the model's size (normalized
        batch-wise in collate), else transformed (augmented with ``pixel_seed`` when augmenting)."""
        if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.shape[-1] == self.image_size:
            return image
        if pixel_seed is not None:
            return self.transform(image, generator=torch.Generator().manual_seed(pixel_seed))
        return self.transform(image)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any] | None:
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        try:
            item = self.dataset[index]
            image = item["image"]
            rendered = isinstance(image, torch.Tensor) and image.dtype == torch.uint8 \
                and image.shape[-1] == self.image_size
            pixel_seed = int(rng.integers(2**62)) if self.augment and not rendered else None
            pixels = self.prepare(image, pixel_seed)
            captions = item["captions"]
            if isinstance(captions, str):
                captions = [captions]
            if not captions:
                raise ValueError(f"sample {index} has no caption")
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
        sample = Sample(item, index, epoch, self.seed, list(captions), caption, which, rng, pixel_seed)
        for data in self.inputs:
            if not data.skips:
                out.update(data.produce(sample, self))
                continue
            try:
                out.update(data.produce(sample, self))
            except (ImageLoadError, ValueError, KeyError, OSError) as e:
                return {"error": f"sample {index}: {e}"}
        return out


def make_collate(tokenizer: Callable[[list[str]], torch.Tensor], **slots: int | None):
    """Stack a batch: the images and captions, then the fields of every data input the items hold
    (:data:`clipforge.train.inputs.DATA_INPUTS`, each with its own collate). ``slots`` ({data input
    name: K}, e.g. ``negatives=2``, ``positives=3``, ``regions=4``) pads that input's per-sample lists
    to K with the mask False on the padding, so every micro-batch of a step has the same [B, K]
    layout; default: the batch's largest count."""
    unknown = sorted(set(slots) - {d.name for d in DATA_INPUTS})
    if unknown:
        raise TypeError(f"make_collate has no slots for {unknown}; data inputs: {[d.name for d in DATA_INPUTS]}")

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
        for data in DATA_INPUTS:
            if any(f in good[0] for f in data.fields):
                batch.update(data.collate(good, tokenizer, slots.get(data.name)))
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
                      collate_fn=make_collate(tokenizer, **{d.name: d.slots(items) for d in items.inputs if d.slots}),
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
