"""CLIPPINGS: record linkage with pooled image+text CLIP embeddings.

Paper: Arora, Dell et al., "Linking Representations with Multimodal Contrastive Learning" (CLIPPINGS,
Contrastively Linking Pooled Pre-trained Embeddings, 2023). A record is an image and a text (in the
paper a document crop and its OCR). Its representation is the *pooled* embedding

    z = normalize( (f_img(x) / ||f_img(x)|| + f_txt(t) / ||f_txt(t)||) / 2 ),                  (pooling)

trained end to end with a supervised contrastive loss (Khosla et al., NeurIPS 2020, eq. 2, "L_out") over
the records of a batch, records of the same entity being positives:

    L = 1/|I'| sum_{i in I'} -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a != i} exp(z_i.z_a / tau) )

with P(i) the other records of i's entity and I' the anchors that have at least one positive. At
inference, records are linked (i) by nearest neighbours with a threshold: each record is joined to its
nearest other record when their cosine is at least ``threshold``, and the links' connected components
are the entities; or (ii) by clustering: average-linkage agglomerative clustering on cosine distance,
cut at ``1 - threshold`` (scipy.cluster.hierarchy).

Simplifications, said here and in docs/retrieval_systems.md: no self-supervised image-OCR pre-training stage
(the model given is fine-tuned directly); nearest-neighbour linkage is within the record set (the paper
also links to an offline exemplar index); batches are drawn with ``per_entity`` records of each of
``batch_entities`` entities (the paper's sampler keeps several records per class in a batch as well);
the temperature is fixed. ``modality`` ``image`` / ``text`` give the unimodal baselines.

Linkage quality (pairwise precision/recall/F1 and the adjusted Rand index) is
:func:`clipforge.metrics.pairwise_linkage_metrics` and :func:`clipforge.metrics.adjusted_rand_index`.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

MODALITIES = ("pooled", "image", "text")
METHODS = ("nn", "cluster")


def pool(image_features: Tensor, text_features: Tensor) -> Tensor:
    """The pooled record embedding: the mean of the unit image and text embeddings, renormalized."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"image {tuple(image_features.shape)} and text {tuple(text_features.shape)} features of the "
                         "records must have the same shape")
    return F.normalize((F.normalize(image_features, dim=-1) + F.normalize(text_features, dim=-1)) / 2, dim=-1)


def record_features(image_features: Tensor, text_features: Tensor, modality: str = "pooled") -> Tensor:
    """What linkage compares: ``pooled`` (CLIPPINGS), or the ``image`` or ``text`` embeddings alone (unit norm)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if modality == "image":
        return F.normalize(image_features, dim=-1)
    if modality == "text":
        return F.normalize(text_features, dim=-1)
    return pool(image_features, text_features)


def supcon_loss(z: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss L_out (Khosla et al., eq. 2) of unit embeddings ``z`` [N, d] with ``labels`` [N].

    Anchors without a positive in the batch are left out; a batch with no positive pair at all raises.
    """
    if z.shape[0] != labels.shape[0]:
        raise ValueError(f"{z.shape[0]} embeddings but {labels.shape[0]} labels")
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = (z @ z.t()) / temperature
    logits = logits.masked_fill(eye, float("-inf"))  # a != i
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    counts = positives.sum(1)
    anchors = counts > 0
    if not bool(anchors.any()):
        raise ValueError("supcon_loss: no two records of the batch share an entity; batches need positives")
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(1)[anchors]) / counts[anchors]
    return per_anchor.mean()


@dataclass
class FinetuneConfig:
    """CLIPPINGS fine-tuning: ``steps`` of AdamW at ``lr``; batches of ``per_entity`` records from each of
    ``batch_entities`` entities; SupCon temperature ``temperature``; ``modality`` pooled (CLIPPINGS) or a
    unimodal baseline."""

    steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_entities: int = 16
    per_entity: int = 4
    temperature: float = 0.1
    modality: str = "pooled"
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.lr <= 0 or self.temperature <= 0:
            raise ValueError("fine-tuning needs steps >= 0, lr > 0 and temperature > 0")
        if self.batch_entities < 2 or self.per_entity < 2:
            raise ValueError("batches need >= 2 entities with >= 2 records each (positives and negatives)")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}")


def _batches(labels: np.ndarray, cfg: FinetuneConfig, rng: np.random.Generator):
    groups: dict[int, np.ndarray] = {}
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        if len(idx) >= 2:
            groups[int(lab)] = idx
    if len(groups) < 2:
        raise ValueError("fine-tuning needs at least 2 entities with 2 or more records each")
    keys = np.array(sorted(groups))
    while True:
        chosen = rng.choice(keys, size=min(cfg.batch_entities, len(keys)), replace=False)
        yield np.concatenate([rng.choice(groups[int(k)], size=cfg.per_entity, replace=len(groups[int(k)])
                                         < cfg.per_entity) for k in chosen])


def finetune(model, images: Tensor, tokens: Tensor, labels: Sequence[int], cfg: FinetuneConfig | None = None) -> list:
    """Fine-tune ``model`` (a clipforge CLIP: ``encode_image``, ``encode_text``) in place on linked records.

    ``images`` [N, 3, H, W] preprocessed pixels, ``tokens`` [N, L] token ids, ``labels`` the entity of each
    record. Returns the loss per step.
    """
    cfg = cfg or FinetuneConfig()
    labels = np.asarray(labels)
    if not (images.shape[0] == tokens.shape[0] == len(labels)):
        raise ValueError(f"{images.shape[0]} images, {tokens.shape[0]} texts and {len(labels)} labels: one each per "
                         "record")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    was_training = model.training
    model.train()
    history = []
    batches = _batches(labels, cfg, rng)
    try:
        for step in range(cfg.steps):
            idx = torch.from_numpy(next(batches))
            v = model.encode_image(images[idx]) if cfg.modality != "text" else None
            t = model.encode_text(tokens[idx]) if cfg.modality != "image" else None
            z = record_features(v if v is not None else t, t if t is not None else v, cfg.modality)
            loss = supcon_loss(z.float(), torch.as_tensor(labels)[idx], cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            if step % 25 == 0:
                log.info("clippings fine-tune step %d/%d: loss %.4f", step, cfg.steps, float(loss.detach()))
    finally:
        model.train(was_training)
    return history


@torch.no_grad()
def embed_records(model, images: Tensor, tokens: Tensor, modality: str = "pooled", batch_size: int = 128) -> Tensor:
    """Unit record embeddings [N, d] under ``modality``."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        v = model.encode_image(images[i:i + batch_size]).float()
        t = model.encode_text(tokens[i:i + batch_size]).float()
        out.append(record_features(v, t, modality))
    model.train(was)
    return torch.cat(out) if out else torch.empty(0)


def nearest_neighbours(z: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """For each record, its nearest other record and their cosine (``z`` unit rows)."""
    if z.shape[0] < 2:
        raise ValueError("linkage needs at least 2 records")
    sims = (z @ z.t()).float()
    sims.fill_diagonal_(-math.inf)
    score, nn = sims.max(dim=1)
    return nn.numpy(), score.numpy()


def link_nearest(z: Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest-neighbour linkage: (entity id per record, nearest neighbour, its cosine).

    Record i is linked to its nearest neighbour when their cosine is >= ``threshold``; entities are the
    connected components of those links (scipy.sparse.csgraph)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nn, score = nearest_neighbours(z)
    keep = score >= threshold
    n = z.shape[0]
    rows = np.flatnonzero(keep)
    graph = coo_matrix((np.ones(len(rows)), (rows, nn[keep])), shape=(n, n))
    _, comp = connected_components(graph, directed=True, connection="weak")
    return comp.astype(np.int64), nn, score


def link_clusters(z: Tensor, threshold: float) -> np.ndarray:
    """Clustering linkage: average-linkage agglomerative clustering on cosine distance, cut where the average
    cosine distance between clusters exceeds ``1 - threshold`` (scipy.cluster.hierarchy). Entity id per record."""
    from scipy.cluster.hierarchy import fcluster, linkage

    if z.shape[0] < 2:
        raise ValueError("linkage needs at least 2 records")
    x = z.double().numpy()
    tree = linkage(x, method="average", metric="cosine")
    return (fcluster(tree, t=1.0 - threshold, criterion="distance") - 1).astype(np.int64)


@dataclass
class Records:
    """Records to link: ``ids``, image paths, texts and, when the file gives them, the true ``entities``."""

    ids: list[str]
    images: list[str]
    texts: list[str]
    entities: list[str] | None

    def __len__(self) -> int:
        return len(self.ids)


RECORD_HELP = ("a records file is .jsonl (one object per line) or .csv with the fields id, image (a path, relative "
               "to the file's folder), text and optionally entity (the true entity, for fine-tuning and evaluation)")


def read_records(path: str | os.PathLike) -> Records:
    """Read a records file (.jsonl or .csv; see :data:`RECORD_HELP`). Every record needs an image that exists and a
    non-empty text: a record without either is a :class:`clipforge.errors.ConfigError` naming it and the fix."""
    import csv
    import json

    from ..errors import ConfigError, MissingInputError

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"records file '{path}' does not exist; {RECORD_HELP}")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{n} is not JSON ({e.msg}); {RECORD_HELP}") from None
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ConfigError(f"records file '{path}' must end in .jsonl or .csv; {RECORD_HELP}")
    if len(rows) < 2:
        raise ConfigError(f"{path} holds {len(rows)} record(s); linkage needs at least 2")
    ids, images, texts, entities = [], [], [], []
    has_entity = all(r.get("entity") not in (None, "") for r in rows)
    for n, r in enumerate(rows, 1):
        rid = str(r.get("id") if r.get("id") not in (None, "") else n)
        image, text = r.get("image"), r.get("text")
        missing = [name for name, v in (("image", image), ("text", text)) if v is None or not str(v).strip()]
        if missing:
            raise ConfigError(f"record {rid!r} ({path}, record {n}) has no {' and no '.join(missing)}: CLIPPINGS links "
                              "records by their image and their text together; give every record both (or drop it)")
        full = (path.parent / str(image)).resolve()
        if not full.is_file():
            raise MissingInputError(f"record {rid!r} ({path}, record {n}): image '{image}' not found at {full}; image "
                                    "paths are relative to the records file's folder")
        ids.append(rid)
        images.append(str(full))
        texts.append(str(text).strip())
        entities.append(str(r.get("entity")) if has_entity else "")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"{path}: id {dup!r} is given to more than one record; ids must be unique")
    return Records(ids, images, texts, entities if has_entity else None)


def load_records(records: Records, preprocess, tokenizer) -> tuple[Tensor, Tensor]:
    """(pixels [N, 3, H, W], token ids [N, L]) of the records."""
    from ..images import load_image

    pixels = torch.stack([preprocess(load_image(p)) for p in records.images])
    return pixels, tokenizer(records.texts)


def link(z: Tensor, method: str = "nn", threshold: float = 0.8) -> np.ndarray:
    """Entity id per record by ``nn`` (:func:`link_nearest`) or ``cluster`` (:func:`link_clusters`)."""
    if method not in METHODS:
        raise ValueError(f"linkage method must be one of {', '.join(METHODS)}, got {method!r}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"the linkage threshold is a cosine in [-1, 1], got {threshold}")
    return link_nearest(z, threshold)[0] if method == "nn" else link_clusters(z, threshold)


__all__ = ["FinetuneConfig", "METHODS", "MODALITIES", "RECORD_HELP", "Records", "embed_records", "finetune", "link",
           "link_clusters", "link_nearest", "load_records", "nearest_neighbours", "pool", "read_records",
           "record_features", "supcon_loss"]
