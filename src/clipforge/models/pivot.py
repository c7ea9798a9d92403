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
is any callable ``texts -> [N, d_in]`` (see :mod:`clipforge.models.sentence_encoders`); it is
not part of the module's weights. :func:`save_pivot` / :func:`load_pivot` write and read the
whole model (the CLIP model, the projection, and the encoder's spec); training is
``clipforge.train.pivot``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.nn.functional as F
from safetensors.torch import save_file
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


PIVOT_FILE = "pivot.json"


def save_pivot(model: PivotCLIP, directory: str | Path, encoder_spec: str, config: Any = None) -> Path:
    """Write ``clip/`` (the CLIP model), ``projection.safetensors`` and ``pivot.json`` (how to rebuild).

    ``encoder_spec``: the :func:`~clipforge.models.sentence_encoders.sentence_encoder` spec that
    rebuilds the encoder; ``config``: the training config (a dataclass or dict), stored for the record.
    """
    from .io import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model.clip, directory / "clip")
    p = model.projection
    save_file(
        {k: v.detach().contiguous() for k, v in p.state_dict().items()}, str(directory / "projection.safetensors")
    )
    record = asdict(config) if is_dataclass(config) else config
    meta = {"format": "clipforge-pivot-1", "encoder": encoder_spec, "in_dim": p.in_dim, "out_dim": p.out_dim,
            "hidden": p.hidden, "config": record}
    (directory / PIVOT_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_pivot(directory: str | Path, encoder=None, allow_nonfinite: bool = False) -> PivotCLIP:
    """Rebuild a saved :class:`PivotCLIP`; the sentence encoder comes from ``pivot.json`` unless given.

    Non-finite weights (CLIP model or projection) are refused unless ``allow_nonfinite``.
    """
    from .io import check_finite, load_model, read_safetensors
    from .sentence_encoders import sentence_encoder

    directory = Path(directory)
    meta_path = directory / PIVOT_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"'{directory}' has no {PIVOT_FILE}: not a directory written by save_pivot")
    meta = json.loads(meta_path.read_text())
    projection = PivotProjection(meta["in_dim"], meta["out_dim"], meta["hidden"])
    projection.load_state_dict(read_safetensors(directory / "projection.safetensors"))
    check_finite(projection, str(directory / "projection.safetensors"), allow_nonfinite)
    clip = load_model(directory / "clip", allow_nonfinite=allow_nonfinite).eval()
    encoder = encoder if encoder is not None else sentence_encoder(meta["encoder"])
    if getattr(encoder, "dim", meta["in_dim"]) != meta["in_dim"]:
        raise ValueError(f"the projection in '{directory}' expects {meta['in_dim']}-d features from "
                         f"'{meta['encoder']}', but the given encoder gives {encoder.dim}-d")
    projection.eval()
    return PivotCLIP(clip, encoder, projection)
