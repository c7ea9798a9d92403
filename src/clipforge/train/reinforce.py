"""MobileCLIP's reinforced dataset (Vasu et al., 2024, "MobileCLIP: Fast Image-Text Models through Multi-Modal
Reinforced Training"): knowledge from teachers stored with the data, written once, read by every training run.

For each training image i, :func:`reinforce` stores

- K augmentations a_{i,1..K}: the random draws of the training transform (crop box, flip, jitter factors,
  :class:`clipforge.transforms.Augmentation`), drawn from a generator seeded by (seed, i, k), so they are
  reproducible and the pixels of view k are ``TrainTransform.replay(image_i, a_{i,k})``;
- the captions: the sample's own and S synthetic ones;
- for every teacher t, the embedding of every augmented view, image[t] [N, K, d_t], and of every caption,
  text[t] [N, C, d_t] (zero rows past a sample's last caption), each L2-normalized.

Training with ``data.reinforced=DIR`` (and a term that reads teacher embeddings) draws, for each sample and
step, one of the K stored augmentations and one of the stored captions (uniformly; the caption policy does not
apply), replays the augmentation (so the image the student sees is the one the teacher embedded) and
hands the two stored embeddings to the distillation terms (``distill_kl``, ...) as ``teacher_image_features``
and ``teacher_text_features``: no teacher runs during training.

Simplifications, said here and in docs/models.md: the synthetic captions are the corpus's rule rewrites of
the first caption (:class:`clipforge.data.rewrites.RuleRewriter`), not a CoCa captioner's; MobileCLIP stores
the augmentations as compact parameters the same way, but its image augmentation also includes RandAugment and
the store is sharded; here it is one set of safetensors files.

Files in DIR: ``reinforce.json`` (dataset, size, seed, image size, K, the transform's options, teachers,
captions per sample), ``augmentations.safetensors`` (``box`` [N, K, 4] int64, ``flip`` [N, K] bool, ``jitter``
[N, K, 3] float64, NaN where a factor is not drawn) and ``teacher_<t>.safetensors`` (``image``, ``text``).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..data import build_dataset
from ..data.rewrites import RuleRewriter
from ..errors import ConfigError, MissingInputError
from ..images import load_image
from ..transforms import Augmentation, TrainTransform

log = logging.getLogger(__name__)

FORMAT = "clipforge-reinforced-1"


def augmentation_generator(seed: int, index: int, k: int) -> torch.Generator:
    """The generator of sample ``index``'s augmentation ``k`` (reproducible from the three numbers)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) * 1_009 + k)


def sample_captions(item: dict, synthetic: int, seed: int, index: int) -> list[str]:
    """The sample's captions followed by ``synthetic`` rule rewrites of its first caption (new ones only)."""
    caps = item["captions"]
    caps = [caps] if isinstance(caps, str) else list(caps)
    if synthetic:
        extra = RuleRewriter().rewrite([caps[0]], synthetic, seed * 1_000_003 + index)[0]
        caps += [c for c in dict.fromkeys(extra) if c not in caps]
    return caps


@dataclass
class ReinforcedStore:
    """A reinforced dataset read back: per sample the K augmentations, the captions, and per teacher
    ``image[t]`` [N, K, d_t] and ``text[t]`` [N, C, d_t]."""

    meta: dict
    box: Tensor
    flip: Tensor
    jitter: Tensor
    captions: list[list[str]]
    image: list[Tensor]
    text: list[Tensor]

    @property
    def k(self) -> int:
        return self.box.shape[1]

    def augmentation(self, index: int, k: int) -> Augmentation:
        factors = tuple(None if math.isnan(f) else f for f in self.jitter[index, k].tolist())
        return Augmentation(tuple(int(v) for v in self.box[index, k]), bool(self.flip[index, k]), factors)

    def transform(self) -> TrainTransform:
        t = self.meta["transform"]
        return TrainTransform(self.meta["image_size"], scale=tuple(t["scale"]), ratio=tuple(t["ratio"]),
                              hflip=t["hflip"], jitter=t["jitter"])

    def lookup(self, index: int, k: int, caption: int) -> tuple[list[Tensor], list[Tensor]]:
        """Every teacher's embedding of sample ``index``'s view ``k`` and of its caption number ``caption``."""
        return [t[index, k] for t in self.image], [t[index, caption] for t in self.text]

    def produce(self, sample) -> dict:
        """A training sample's fields (a :class:`clipforge.train.inputs.Sample`): one of its K stored views
        replayed and one of its stored captions, each drawn from a stream of the sample's own (uniformly, whatever
        the caption policy), and every teacher's embeddings of that view and that caption."""
        view = int(sample.stream(6).integers(self.k))
        captions = self.captions[sample.index]
        which = int(sample.stream(7).integers(len(captions)))
        pixels = self.transform().replay(sample.item["image"], self.augmentation(sample.index, view))
        image, text = self.lookup(sample.index, view, which)
        return {"pixels": pixels, "caption": captions[which], "teacher_image": image, "teacher_text": text}

    def check_matches(self, dataset: str, size: int, seed: int, image_size: int) -> None:
        want = {"dataset": dataset, "size": size, "seed": seed, "image_size": image_size}
        got = {key: self.meta[key] for key in want}
        if got != want:
            raise ConfigError(f"the reinforced dataset was written for {got}, but training reads {want}; write it "
                              "again with clipforge data reinforce for these settings, or train with its settings")


@torch.no_grad()
def reinforce(dataset: str, teachers: Sequence[str], out: str | Path, augmentations: int = 4, synthetic: int = 2,
              size: int = 1024, seed: int = 0, image_size: int = 64, scale: tuple[float, float] = (0.5, 1.0),
              ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = False, jitter: float = 0.2,
              batch_size: int = 128) -> ReinforcedStore:
    """Write the reinforced dataset of ``dataset``'s first ``size`` training samples (module docstring)."""
    from ..interop import load

    if augmentations < 1 or synthetic < 0 or not teachers:
        raise ConfigError(f"reinforce needs --augmentations >= 1, --synthetic >= 0 and at least one teacher; got "
                          f"{augmentations}, {synthetic}, {list(teachers)}")
    ds = build_dataset(dataset, split="train", size=size, seed=seed, image_size=image_size)
    size = len(ds)
    transform = TrainTransform(image_size, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip, jitter=jitter)
    box = torch.zeros(size, augmentations, 4, dtype=torch.int64)
    flip = torch.zeros(size, augmentations, dtype=torch.bool)
    factors = torch.full((size, augmentations, 3), float("nan"), dtype=torch.float64)  # the draws exactly
    captions, views = [], []
    for i in range(size):
        item = ds[i]
        img = load_image(item["image"])
        for k in range(augmentations):
            aug = transform.draw(img.width, img.height, augmentation_generator(seed, i, k))
            box[i, k] = torch.tensor(aug.box)
            flip[i, k] = aug.flip
            factors[i, k] = torch.tensor([float("nan") if f is None else f for f in aug.jitter], dtype=torch.float64)
            views.append(transform.replay(img, aug))
        captions.append(sample_captions(item, synthetic, seed, i))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"box": box, "flip": flip, "jitter": factors}, str(out / "augmentations.safetensors"))
    width = max(len(c) for c in captions)
    flat = [c for caps in captions for c in caps]
    for t, path in enumerate(teachers):
        model, tokenizer, _ = load(path)
        if model.image_size != image_size:
            raise ConfigError(f"teacher '{path}' reads {model.image_size} px images and the reinforced views are "
                              f"{image_size} px; give --image-size {model.image_size} or teachers of one resolution")
        log.info("teacher %s: embedding %d views and %d captions", path, len(views), len(flat))
        img = torch.cat([model.encode_image(torch.stack(views[j:j + batch_size])).float()
                         for j in range(0, len(views), batch_size)]).view(size, augmentations, -1)
        feats = torch.cat([model.encode_text(tokenizer(flat[j:j + batch_size])).float()
                           for j in range(0, len(flat), batch_size)])
        text = torch.zeros(size, width, feats.shape[-1])
        pos = 0
        for i, caps in enumerate(captions):
            text[i, :len(caps)] = feats[pos:pos + len(caps)]
            pos += len(caps)
        save_file({"image": img.contiguous(), "text": text.contiguous()}, str(out / f"teacher_{t}.safetensors"))
    meta = {"format": FORMAT, "dataset": dataset, "size": size, "seed": seed, "image_size": image_size,
            "augmentations": augmentations, "synthetic": synthetic, "teachers": [str(p) for p in teachers],
            "transform": {"scale": list(scale), "ratio": list(ratio), "hflip": hflip, "jitter": jitter},
            "captions": captions}
    (out / "reinforce.json").write_text(json.dumps(meta, indent=1))
    return load_reinforced(out)


def load_reinforced(directory: str | Path) -> ReinforcedStore:
    """A reinforced dataset written by :func:`reinforce` (``clipforge data reinforce``)."""
    directory = Path(directory)
    meta_file = directory / "reinforce.json"
    if not meta_file.is_file():
        raise MissingInputError(f"'{directory}' is not a reinforced dataset (no reinforce.json); write one with "
                                "clipforge data reinforce SRC --teachers RUN --augmentations K --out DIR")
    meta: dict[str, Any] = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"'{meta_file}' has format {meta.get('format')!r}, this clipforge reads {FORMAT!r}")
    aug = load_file(str(directory / "augmentations.safetensors"))
    image, text = [], []
    for t in range(len(meta["teachers"])):
        stored = load_file(str(directory / f"teacher_{t}.safetensors"))
        image.append(stored["image"])
        text.append(stored["text"])
    return ReinforcedStore(meta, aug["box"], aug["flip"], aug["jitter"], meta["captions"], image, text)
