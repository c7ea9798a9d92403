"""Teacher embeddings stored with the training data: one un-augmented embedding per image and
per caption (not MobileCLIP's "reinforced" dataset, which stores many augmented views and
synthetic captions per image).

``data.teachers`` lists frozen clipforge models (checkpoint or run directories). Before the
first step, each teacher embeds every training image (as the student sees it without
augmentation, rendered at the teacher's own resolution) and every caption of every sample,
once. The embeddings are saved under ``data.teacher_cache`` (safetensors, one file per
teacher, named by a hash of dataset, size, seed and teacher weights) and re-used by later
runs. A training step then looks up the embeddings of its images and of the caption it drew,
so the distillation terms (``distill_kl``, ``hycd``, ``dclip``) cost no teacher forward pass.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)
from torch import Tensor

from ..data import build_dataset
from ..tokenizer import get_tokenizer
from ..transforms import image_transform, normalize_batch


@dataclass
class TeacherStore:
    """Per teacher k: ``image[k]`` [N, d_k] and ``text[k]`` [N, C, d_k] (each sample's captions,
    zero rows past its last caption)."""

    image: list[Tensor]
    text: list[Tensor]

    def lookup(self, index: int, caption: int) -> tuple[list[Tensor], list[Tensor]]:
        """Every teacher's embedding of sample ``index``'s image and of its caption number ``caption``."""
        return [t[index] for t in self.image], [t[index, caption] for t in self.text]


def _pixels(images: Sequence, image_size: int) -> Tensor:
    """The eval-time preprocessing of the training pipeline (no augmentation)."""
    if all(isinstance(im, Tensor) and im.dtype == torch.uint8 and im.shape[-1] == image_size for im in images):
        return normalize_batch(torch.stack(list(images)))
    transform = image_transform(image_size, is_train=False)
    return torch.stack([transform(im) for im in images])


@torch.no_grad()
def embed_training_set(teacher, dataset_name: str, size: int, seed: int, batch_size: int = 256,
                       tokenizer=None) -> tuple[Tensor, Tensor]:
    """A teacher's embeddings of every training image [N, d] and of every caption [N, C, d].
    ``tokenizer``: the teacher's own (default CLIP's BPE; a Hugging Face text tower needs its own)."""
    ds = build_dataset(dataset_name, split="train", size=size, seed=seed, image_size=teacher.image_size)
    size = len(ds)  # a built corpus may hold fewer samples than asked for
    tokenizer = tokenizer or get_tokenizer(teacher.context_length)
    images, captions = [], []
    for start in range(0, size, batch_size):
        items = [ds[i] for i in range(start, min(size, start + batch_size))]
        images.append(teacher.encode_image(_pixels([it["image"] for it in items], teacher.image_size)).float())
        captions += [[it["captions"]] if isinstance(it["captions"], str) else list(it["captions"]) for it in items]
    width = max(len(c) for c in captions)
    flat = [t for c in captions for t in c]
    feats = torch.cat([teacher.encode_text(tokenizer(flat[i:i + batch_size])).float()
                       for i in range(0, len(flat), batch_size)])
    text = torch.zeros(size, width, feats.shape[-1])
    pos = 0
    for i, c in enumerate(captions):
        text[i, :len(c)] = feats[pos:pos + len(c)]
        pos += len(c)
    return torch.cat(images), text


def _cache_name(teacher_dir: Path, dataset_name: str, size: int, seed: int) -> str:
    stamp = [(str(w), w.stat().st_size, w.stat().st_mtime_ns) for w in sorted(teacher_dir.rglob("model.safetensors"))]
    key = json.dumps([str(teacher_dir.resolve()), stamp, dataset_name, size, seed])
    return f"teacher_{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors"


def load_teacher_store(teachers: Sequence[str], dataset_name: str, size: int, seed: int, cache_dir: str | Path,
                       log=logger.info) -> TeacherStore:
    """Embeddings of every teacher, computed once and cached in ``cache_dir`` (``log`` reports each one computed)."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    image, text = [], []
    for path in teachers:
        teacher_dir = Path(path)
        file = cache / _cache_name(teacher_dir, dataset_name, size, seed)
        if not file.exists():
            log(f"embedding {size} training samples with teacher {teacher_dir} (once; cached in {file})")
            from ..interop import load  # the teacher's own tokenizer comes with it

            model, tokenizer, _ = load(teacher_dir)
            img, txt = embed_training_set(model, dataset_name, size, seed, tokenizer=tokenizer)
            save_file({"image": img.contiguous(), "text": txt.contiguous()}, str(file))
        stored = load_file(str(file))
        image.append(stored["image"])
        text.append(stored["text"])
    return TeacherStore(image, text)
