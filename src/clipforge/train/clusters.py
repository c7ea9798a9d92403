"""MLCD's offline step: cluster centers and multi-labels from a trained model's features, computed once.

An et al. ("Multi-label Cluster Discrimination for Visual Representation Learning", ECCV 2024)
cluster the training set's embeddings from an existing model once, offline, and train a new model
to classify every image into its l nearest centers. :func:`compute_clusters` embeds the training
images with a frozen model (as the training pipeline shows them, without augmentation), runs
k-means on the normalized features (:func:`clipforge.losses.mlcd.cluster_centers`) and keeps the
centers and the features; :func:`save_clusters` writes them with the model's identity (its source
and a hash of its weights) and the data's identity (dataset, size, seed, root), ``clipforge data
cluster`` runs both. A training run names the file in the ``mlcd`` term's ``clusters`` option:
the term's centers are the stored ones (fixed) and each sample's labels are the ``num_labels``
centers nearest to its *stored* feature (:func:`load_cluster_labels`), not to the features of
the model being trained.

Simplifications: the paper clusters LAION-400M into one million centers with off-the-shelf embedding
features; here a small training set into K centers with a clipforge model. The discrimination step here
scores the fixed centers (whether the paper's classifier weights are trained from them we could not
check from its abstract).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..losses.mlcd import CLUSTERS_FORMAT, read_clusters
from ..transforms import image_transform, normalize_batch

logger = logging.getLogger(__name__)



def weights_fingerprint(model: torch.nn.Module) -> str:
    """A sha256 of the model's state dict (names, shapes, dtypes and values): who made the features."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def image_features(model, dataset, batch_size: int = 128) -> Tensor:
    """The model's normalized image features of every item of ``dataset`` [N, d], un-augmented."""
    model.eval()
    transform = image_transform(model.image_size, is_train=False)
    out = []
    for start in range(0, len(dataset), batch_size):
        images = [dataset[i]["image"] for i in range(start, min(len(dataset), start + batch_size))]
        if all(isinstance(im, Tensor) and im.dtype == torch.uint8 and im.shape[-1] == model.image_size
               for im in images):
            pixels = normalize_batch(torch.stack(images))
        else:
            pixels = torch.stack([transform(im) for im in images])
        out.append(torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1))
    return torch.cat(out)


def compute_clusters(model, dataset, k: int, iters: int = 20, seed: int = 0,
                     batch_size: int = 128) -> dict[str, Tensor]:
    """{"centers": [k, d] unit vectors, "features": [N, d]} of ``dataset`` under ``model``."""
    from ..losses.mlcd import cluster_centers

    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(dataset):
        raise ValueError(f"--k must be an integer between 1 and the number of samples ({len(dataset)}), got {k!r}")
    features = image_features(model, dataset, batch_size)
    return {"centers": cluster_centers(features, k, iters, seed), "features": features}


def save_clusters(path: str | Path, clusters: dict[str, Tensor], model_info: dict[str, Any], data_info: dict[str, Any],
                  k: int, iters: int, seed: int) -> Path:
    """Write the centers, the features and who and what made them to ``path`` (torch, tensors and plain values)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": CLUSTERS_FORMAT, "centers": clusters["centers"].contiguous(),
              "features": clusters["features"].contiguous(),
              "model": dict(model_info), "data": dict(data_info), "k": k, "iters": iters, "seed": seed}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(record, tmp)
    tmp.replace(path)
    return path


def data_identity(cfg_data, dataset) -> dict[str, Any]:
    """What selects the training samples: dataset name, size asked for, data seed, root, and the count."""
    return {"dataset": cfg_data.dataset, "size": cfg_data.train_size, "seed": cfg_data.seed,
            "root": str(cfg_data.root) if cfg_data.root else None, "samples": len(dataset)}


def load_cluster_labels(path: str | Path, num_labels: int, identity: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(centers [K, d], labels [N, num_labels]) of a cluster file for the training set ``identity``
    (:func:`data_identity`); the labels are the centers nearest to each stored feature."""
    from ..losses.mlcd import nearest_centers

    record = read_clusters(path)
    stored = record["data"]
    differs = {key: (stored.get(key), value) for key, value in identity.items() if stored.get(key) != value}
    if differs:
        raise ValueError(f"mlcd clusters: {path} was computed for other training data ({differs}, file vs run); "
                         "recompute it for this data with `clipforge data cluster RUN --k N --dataset ... --size ... "
                         "--seed ...` or set data.* as when it was computed")
    centers = record["centers"].float()
    return centers, nearest_centers(record["features"].float(), centers, num_labels)
