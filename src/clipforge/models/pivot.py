"""A CLIP whose text side is a frozen (multilingual) sentence encoder plus a trained projection.

uCLIP (Chung et al., 2025, "Parameter-Efficient Multilingual Extension of Vision-Language
Models with Unpaired Data") extends an English CLIP to other languages without any
multilingual image-text or translation pairs: a frozen multilingual encoder M maps every
language into one space, and a small projection P is trained on *English* text alone so
that P(M(x_en)) lands where CLIP's own text tower T puts x_en (English is the pivot). Since
M places a caption and its translations close together, P(M(x_de)) then lands near
T(x_en) too, and so near the image embeddings CLIP aligned with it:

    text embedding  t(x) = normalize(P(M(x))),   image embedding  v = CLIP.encode_image(img)

:class:`PivotProjection` is P (a two-layer MLP, or linear with ``hidden=0``);
:class:`PivotCLIP` puts it together. ``encode_text`` takes the raw strings (the "tokenizer"
of this model is :func:`texts_as_is`) or precomputed encoder features. The sentence encoder
is any callable ``texts -> [N, d_in]`` (see ``clipforge.interop.sentence_encoders``); it is
not part of the module's weights.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def texts_as_is(texts: Sequence[str]) -> list[str]:
    """The tokenizer of a :class:`PivotCLIP`: the sentence encoder reads raw text."""
    return [str(t) for t in texts]


class PivotProjection(nn.Module):
    """P: d_in -> embed_dim; ``hidden > 0`` gives Linear-GELU-Linear, ``hidden = 0`` one Linear."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 1024):
        super().__init__()
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0 = linear), got {hidden}")
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden
        if hidden:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        else:
            self.net = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"the projection expects {self.in_dim}-d sentence features, got {x.shape[-1]}-d: "
                             "was it trained with a different sentence encoder?")
        return self.net(x)


class PivotCLIP(nn.Module):
    """CLIP's image tower with a sentence-encoder text side: ``encode_image`` / ``encode_text``."""

    def __init__(self, clip: nn.Module, encoder: Callable[[Sequence[str]], Tensor], projection: PivotProjection):
        super().__init__()
        self.clip, self.projection = clip, projection
        self.encoder = encoder  # a plain callable, frozen; not a submodule, not in state_dict
        self.cfg = getattr(clip, "cfg", None)

    @property
    def image_size(self) -> int:
        return self.clip.image_size

    def scale(self) -> Tensor:
        return self.clip.scale()

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, texts: Sequence[str] | Tensor, normalize: bool = True) -> Tensor:
        """``texts``: strings (encoded by the sentence encoder) or its features [N, d_in]."""
        feats = texts if isinstance(texts, Tensor) else self.encoder(list(texts))
        param = next(self.projection.parameters())
        z = self.projection(feats.to(param.device, param.dtype))
        return F.normalize(z, dim=-1) if normalize else z
