"""What a loss term can receive from the training program, declared once.

A loss term names the ``LossInputs.extra`` entries (or token fields) it reads in its ``extra_keys``;
:data:`INPUTS` lists every one the program can produce, each as an :class:`ExtraInput` with the
code that turns a batch into it. The loop calls :func:`encode_extras` (the model being trained,
with gradients) and :func:`encode_ema` (the EMA copy, without) and stays generic; the set of
producible keys (:data:`PRODUCED`), the keys only the map-style loader can deliver
(:data:`FROM_DATASET`) and the EMA keys (:data:`EMA_KEYS`) are read off the table.

Adding an input is one entry here (plus, for a new batch field, what :mod:`.data` puts in the
batch and when :mod:`.setup` asks it to).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn

# extra inputs the training program can produce
NEGATIVES, COUNTS, POSITIVES = "negative_text_features", "count_negative_text_features", "positive_text_features"
VIEW2, SYNTHETIC, TAGS = "image_features_view2", "synthetic_text_features", "short_tag_features"
TEACHER_KEYS = ("teacher_image_features", "teacher_text_features")
REGION_KEYS = ("region_features", "region_text_features", "grounded_boxes")  # CLOC, with region_boxes/_mask
TOKEN_KEYS = ("image_tokens", "text_tokens")  # LossInputs fields (with text_mask), from the model's forward
REGION_NEGATIVES, LONG = "region_negative_text_features", "long_text_features"  # FG-CLIP 2's region negatives, long
GA_DMS_KEYS = ("ga_dms_text_features", "ga_dms_mtp_tokens")  # GA-DMS: noise-masked captions, masked-token states


def _per_sample(encode_text, ids: Tensor) -> Tensor:
    """[B, K, L] token ids (per-sample negatives or positives) -> [B, K, d] features."""
    return encode_text(ids.reshape(-1, ids.shape[-1])).float().view(ids.shape[0], ids.shape[1], -1)


def _regions(model: nn.Module, batch: dict) -> dict:
    """The region captions' text embeddings with the boxes and mask (every region term) and, for a model with
    a region head (CLOC), the region embeddings of the boxes (the head over one pass of the image tower) and
    the boxes the head grounds the captions to. A term that reads those on a model without a region head is
    refused at start-up (train/setup.py)."""
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
    masked-token prediction); the scores come from a pass without gradients."""
    from ..losses.ga_dms import dual_masks

    ids = batch["mask_texts"]
    with torch.no_grad():
        image = model.encode_image(batch["images"]).float()
        text, tokens, mask = model.encode_text_tokens(ids)
    denoised, masked, targets = dual_masks(ids, image, text.float(), tokens.float(), mask,
                                           pad_id=model.text.cfg.pad_token_id, eot_id=model.text.cfg.eot_token_id)
    _, mtp_tokens, _ = model.encode_text_tokens(masked)
    return {"ga_dms_text_features": model.encode_text(denoised).float(), "ga_dms_mtp_tokens": mtp_tokens.float(),
            "ga_dms_mtp_targets": targets}


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
    """

    keys: tuple[str, ...]
    source: Literal["model", "ema", "stored"]
    batch_field: str | None
    map_style_only: bool
    encode: Callable[[nn.Module, dict], dict] | None = None


INPUTS: tuple[ExtraInput, ...] = (
    ExtraInput((VIEW2,), "model", "images_view2", True,
               lambda m, b: {VIEW2: m.encode_image(b["images_view2"]).float()}),
    ExtraInput((SYNTHETIC,), "model", "synthetic_texts", True,
               lambda m, b: {SYNTHETIC: m.encode_text(b["synthetic_texts"]).float()}),
    ExtraInput((TAGS,), "model", "short_tags_texts", True,
               lambda m, b: {TAGS: m.encode_text(b["short_tags_texts"]).float()}),
    ExtraInput(TEACHER_KEYS, "stored", "teacher_image", True,  # lists of [B, d_k], one per teacher
               lambda m, b: dict(zip(TEACHER_KEYS, (b["teacher_image"], b["teacher_text"])))),
    ExtraInput((NEGATIVES,), "model", "negative_texts", True,
               lambda m, b: {NEGATIVES: _per_sample(m.encode_text, b["negative_texts"]),
                             "negative_text_mask": b["negative_mask"]}),
    ExtraInput((POSITIVES,), "model", "positive_texts", True,
               lambda m, b: {POSITIVES: _per_sample(m.encode_text, b["positive_texts"]),
                             "positive_text_mask": b["positive_mask"]}),
    ExtraInput((COUNTS,), "model", "count_negative_texts", True,
               lambda m, b: {COUNTS: m.encode_text(b["count_negative_texts"]).float(),
                             "count_positive_text_features": m.encode_text(b["count_positive_texts"]).float(),
                             "count_mask": b["count_mask"]}),
    ExtraInput(REGION_KEYS, "model", "region_boxes", True, _regions),
    ExtraInput((REGION_NEGATIVES,), "model", "region_negative_texts", True, _region_negatives),
    ExtraInput((LONG,), "model", "long_texts", True, lambda m, b: {LONG: m.encode_text(b["long_texts"]).float()}),
    ExtraInput(GA_DMS_KEYS, "model", "mask_texts", True, _ga_dms),
    ExtraInput(TOKEN_KEYS, "model", None, False),  # the model's forward with return_tokens (setup.token_outputs)
    ExtraInput(("ema_image_features", "ema_text_features"), "ema", "images", False, lambda m, b: _ema_pair(m, b)),
    ExtraInput(("ema_negative_text_features",), "ema", "negative_texts", True,
               lambda m, b: {"ema_negative_text_features": _per_sample(m.encode_text, b["negative_texts"])}),
)

PRODUCED = frozenset(k for i in INPUTS for k in i.keys)
FROM_DATASET = frozenset(k for i in INPUTS if i.map_style_only for k in i.keys)
EMA_KEYS = tuple(k for i in INPUTS if i.source == "ema" for k in i.keys)


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
