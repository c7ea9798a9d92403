"""ComCLIP: training-free compositional image-text matching with entity sub-images.

Jiang et al., "ComCLIP: Training-Free Compositional Image and Text Matching" (2023). A caption
is split into subject, predicate and object (:func:`parse_caption`); the image into sub-images
of those entities (each sub-image is the image with everything outside the entity's box blacked
out, as the released code does; the predicate's sub-image shows subject and object together).
With v the global image embedding, v_k the sub-image embeddings, t the caption embedding and t_k
the embeddings of the words of component k (all from the frozen CLIP, unnormalized):

    w = softmax_k( cos(t_k, v_k) )                 (``weighting="softmax"``, the paper's description)
    w_k = (t_k . v_k) / sum_j (t_j . v_j)           (``weighting="sum"``, the released code)
    v' = v + sum_k w_k v_k,     score(image, caption) = cos(v', t)

Entities are matched to boxes training-free: given boxes (e.g. a dataset's), or the connected
components of non-background pixels (:func:`component_boxes`, enough for ``shapes``; the paper
uses a dense-captioning detector, GRiT), each entity takes the box whose sub-image its words
match best (cosine). Simplifications, stated: a rule parser (shapes' relation phrases, a fixed
list of English prepositions and verbs ending in -ing) stands in for the paper's language-model
parser; one box per entity (the code can overlay several); a caption the parser cannot split is one
subject (the whole caption, matched to one box); an image without a box scores as plain CLIP.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.shapes import RELATIONS
from ..transforms import normalize_batch

logger = logging.getLogger(__name__)

WEIGHTINGS = ("softmax", "sum")
# predicate phrases of plain English the fallback parser knows, longest first where they overlap
PREDICATES = tuple(sorted({*RELATIONS, "in front of", "on top of", "next to", "to the left of", "to the right of",
                           "under", "behind", "beside", "near", "on", "in", "inside", "with", "over", "has",
                           "holds", "wears", "eats", "rides", "chases", "sits on", "stands on"},
                          key=lambda p: -len(p.split())))
_AUX = {"is", "are", "was", "were"}


@dataclass(frozen=True)
class Triplet:
    """A caption's subject, predicate and object; predicate and object are None for a caption
    that names one entity (or that the rule parser cannot split)."""

    subject: str
    predicate: str | None = None
    object: str | None = None

    def components(self) -> list[tuple[str, str]]:
        """(kind, words) of the parsed parts: subject, then object and predicate when present."""
        out = [("subject", self.subject)]
        if self.object:
            out.append(("object", self.object))
        if self.predicate and self.object:
            out.append(("predicate", self.predicate))
        return out


def parse_caption(caption: str) -> Triplet:
    """Subject / predicate / object of a caption by rules. Shapes' relation captions ("a red circle
    left of a blue square.") split at their relation phrase; plain English splits at the first
    known predicate phrase (:data:`PREDICATES`, auxiliaries "is/are" dropped) or else at the first
    word ending in "-ing" ("a man riding a horse"); anything else is one subject."""
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("ComCLIP needs a non-empty caption to parse; got an empty text")
    words = re.sub(r"[.!?]+$", "", caption.strip().lower()).split()
    words = [w for w in words if w not in _AUX] or words
    for i in range(1, len(words) - 1):
        for phrase in PREDICATES:
            n = len(phrase.split())
            if words[i:i + n] == phrase.split() and i + n < len(words):
                return Triplet(" ".join(words[:i]), phrase, " ".join(words[i + n:]))
        if words[i].endswith("ing") and len(words[i]) > 4:
            return Triplet(" ".join(words[:i]), words[i], " ".join(words[i + 1:]))
    return Triplet(" ".join(words))


def component_boxes(image: np.ndarray | Tensor, threshold: int = 40, min_pixels: int = 4) -> np.ndarray:
    """Training-free detector for flat drawings: the boxes (normalized xyxy, [N, 4]) of the
    4-connected components of pixels whose colour differs from the background (the median of the
    border pixels) by more than ``threshold`` (sum of absolute RGB differences), components of at
    least ``min_pixels`` pixels, in order of their first pixel (row-major). ``image``: uint8 [H, W, 3]
    or [3, H, W]."""
    arr = image.numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"component_boxes needs an RGB image [H, W, 3] or [3, H, W], got shape {arr.shape}")
    arr = arr.astype(np.int64)
    h, w = arr.shape[:2]
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = np.median(border, axis=0)
    fg = np.abs(arr - background).sum(-1) > threshold
    seen = np.zeros_like(fg)
    boxes = []
    for y0, x0 in zip(*np.nonzero(fg)):
        if seen[y0, x0]:
            continue
        stack, seen[y0, x0] = [(y0, x0)], True
        ys, xs = [], []
        while stack:
            y, x = stack.pop()
            ys.append(y), xs.append(x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and fg[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(ys) >= min_pixels:
            boxes.append((min(xs) / w, min(ys) / h, (max(xs) + 1) / w, (max(ys) + 1) / h))
    return np.array(boxes, dtype=np.float32).reshape(-1, 4)


def combine(image: Tensor, text: Tensor, sub_images: Tensor, words: Tensor, weighting: str = "softmax") -> Tensor:
    """The ComCLIP score (module docstring) of one image and one caption: unnormalized embeddings
    ``image`` [d], ``text`` [d], ``sub_images`` [K, d] and their components' ``words`` [K, d]."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if len(sub_images) == 0:
        return F.cosine_similarity(image, text, dim=-1)
    if weighting == "softmax":
        w = F.cosine_similarity(words, sub_images, dim=-1).softmax(dim=0)
    else:
        raw = (words * sub_images).sum(-1)
        w = raw / raw.sum()
    return F.cosine_similarity(image + (w[:, None] * sub_images).sum(0), text, dim=-1)


@dataclass
class ComCLIPConfig:
    weighting: str = "softmax"  # "softmax" (the paper) or "sum" (the released code's normalization)
    threshold: int = 40  # component_boxes: colour distance from the background
    min_pixels: int = 4

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"ComCLIP weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")


def _masked(pixels: Tensor, boxes: list[np.ndarray]) -> Tensor:
    """uint8 [3, H, W] with everything outside the union of ``boxes`` black."""
    h, w = pixels.shape[-2:]
    keep = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        keep[int(np.floor(y0 * h)):int(np.ceil(y1 * h)), int(np.floor(x0 * w)):int(np.ceil(x1 * w))] = True
    return pixels * keep


class ComCLIP:
    """ComCLIP over a frozen clipforge model; ``scores(image, captions, boxes=None)`` -> [C] tensor."""

    def __init__(self, model, tokenizer, cfg: ComCLIPConfig | None = None):
        self.model, self.tokenizer, self.cfg = model.eval(), tokenizer, cfg or ComCLIPConfig()

    @torch.no_grad()
    def _images(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(normalize_batch(pixels), normalize=False).float()

    @torch.no_grad()
    def _texts(self, texts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(texts), normalize=False).float()

    @torch.no_grad()
    def scores(self, image: Tensor, captions: list[str], boxes=None) -> tuple[Tensor, Tensor]:
        """(ComCLIP scores [C], plain CLIP cosine scores [C]) of ``image`` (uint8 [3, S, S] at the model's
        size) against ``captions``; ``boxes`` [N, 4] normalized xyxy, else :func:`component_boxes`."""
        size = self.model.image_size
        if not isinstance(image, Tensor) or image.dtype != torch.uint8 or tuple(image.shape) != (3, size, size):
            raise ValueError(f"ComCLIP takes a uint8 image tensor [3, {size}, {size}] (the model's size); got "
                             f"{getattr(image, 'dtype', type(image))} {tuple(getattr(image, 'shape', ()))}: "
                             "render or resize it to the model's image size first")
        if boxes is None:
            boxes = component_boxes(image, self.cfg.threshold, self.cfg.min_pixels)
        else:
            from ..data.regions import check_regions

            boxes = check_regions(boxes, where="ComCLIP boxes")
        v = self._images(image[None])[0]
        t = self._texts(list(captions))
        plain = F.cosine_similarity(v[None], t, dim=-1)
        if len(boxes) == 0:
            return plain.clone(), plain
        box_images = self._images(torch.stack([_masked(image, [b]) for b in boxes]))  # one sub-image per box
        out = []
        for c, caption in enumerate(captions):
            parts = parse_caption(caption).components()
            words = self._texts([p for _, p in parts])
            chosen = {}
            for (kind, _), wk in zip(parts, words):
                if kind != "predicate":
                    chosen[kind] = int(F.cosine_similarity(wk[None], box_images, dim=-1).argmax())
            subs = [box_images[chosen[kind]] if kind != "predicate" else
                    self._images(_masked(image, [boxes[chosen["subject"]], boxes[chosen["object"]]])[None])[0]
                    for kind, _ in parts]
            out.append(combine(v, t[c], torch.stack(subs), words, self.cfg.weighting))
        return torch.stack(out), plain


def swap_accuracy(comclip: ComCLIP, samples) -> dict[str, float]:
    """On ``shapes`` relation samples: how often the true caption (``captions[0]``) scores above each
    typed negative of the sample (``relation``: the relation flipped; ``swap``: subject and object
    swapped), for ComCLIP and plain CLIP, given the scene's boxes and with the component detector."""
    hits = {f"{m}_{k}": [] for m in ("clip", "comclip", "comclip_detected") for k in ("relation", "swap")}
    for s in samples:
        image = torch.from_numpy(s.image).permute(2, 0, 1).contiguous()
        for kind in ("relation", "swap"):
            texts = [s.captions[0], *s.negatives[kind]]
            com, plain = comclip.scores(image, texts, s.boxes)
            det, _ = comclip.scores(image, texts)
            hits[f"clip_{kind}"].append(float(plain[0] > plain[1:].max()))
            hits[f"comclip_{kind}"].append(float(com[0] > com[1:].max()))
            hits[f"comclip_detected_{kind}"].append(float(det[0] > det[1:].max()))
    return {k: float(np.mean(v)) for k, v in hits.items()}
