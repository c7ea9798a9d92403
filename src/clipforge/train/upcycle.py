"""CLIP-MoE's Diversified Multiplet Upcycling (Zhang et al., 2024), the stages before and after the
upcycling itself (:func:`clipforge.models.moe.upcycle`).

1. Multiplet (the paper's Multistage Contrastive Learning, as the official ``train_mcl.py`` runs it).
   Expert 0 is the dense model's FFN. For stage s = 1 .. E-1: embed the training set with the model
   of stage s-1 (image and text embeddings, concatenated), cluster the embeddings with k-means
   (:func:`clipforge.losses.kmeans.kmeans`, ``clusters`` groups) and refine the accumulated
   pseudo-labels (label <- label * clusters + new cluster, so samples share a label only if they
   shared a cluster at every stage so far); then fine-tune a copy of the *dense* model with every
   parameter frozen except the FFNs of the upcycled blocks, with the CLIP loss on batches drawn from
   one pseudo-label at a time, so the negatives are the samples the earlier stages could not tell
   apart and the new FFNs learn what the earlier features missed. Its FFNs become expert s.
2. Upcycle: :func:`~clipforge.models.moe.upcycle` with the E models as donors (all other weights are the
   dense model's, which every stage left unchanged).
3. Router training (the official ``train_moe.py --lock-except-gate``) is a plain clipforge run:
   ``clipforge train init_from=DIR trainable=['*.mlp.router.weight'] loss={clip: 1.0, moe_balance: 0.01}``.

Simplifications: the stages here use one caption per image (the first), un-augmented images, AdamW at a
fixed learning rate, and a batch is ``min(batch_size, label size)`` samples of a pseudo-label drawn with
probability proportional to its size (the official sampler fills fixed-size batches from one label and
runs whole epochs). With ``stage_steps=0`` no multiplet is trained and every expert is a copy of the
dense FFN (plain sparse upcycling: the MoE then equals the dense model until the routers and experts train).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from ..data import build_dataset
from ..losses.clip import clip_loss
from ..losses.kmeans import kmeans
from ..models.clip import CLIP
from ..models.moe import TOWERS, MoECLIP, MoEConfig, moe_layers, upcycle
from ..tokenizer import get_tokenizer
from ..transforms import image_transform, normalize_batch

log = logging.getLogger(__name__)


@dataclass
class MultipletConfig:
    experts: int = 4
    top_k: int = 2
    towers: tuple[str, ...] = TOWERS
    layers: int | None = None  # upcycle the last N blocks of each tower (None: all)
    stage_steps: int = 0  # fine-tuning steps per multiplet stage; 0: identical experts (no multiplet)
    clusters: int = 4  # k-means clusters per stage
    batch_size: int = 64
    lr: float = 1e-4
    dataset: str = "shapes"
    train_size: int = 2048
    seed: int = 0

    def __post_init__(self):
        MoEConfig(self.experts, self.top_k, tuple(self.towers), self.layers)  # validates those four
        if self.stage_steps < 0 or self.clusters < 2 or self.batch_size < 2 or self.train_size < self.clusters:
            raise ValueError(f"multiplet: stage_steps >= 0, clusters >= 2, batch_size >= 2 and train_size >= clusters "
                             f"are needed, got {self.stage_steps}, {self.clusters}, {self.batch_size}, "
                             f"{self.train_size}")


def _load_pairs(model: CLIP, cfg: MultipletConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalized images [N, 3, S, S], token ids [N, L]) of the first ``train_size`` training samples."""
    dataset = build_dataset(cfg.dataset, split="train", size=cfg.train_size, seed=cfg.seed, image_size=model.image_size)
    tokenizer = get_tokenizer(model.context_length)
    transform = image_transform(model.image_size)
    images, captions = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        image = item["image"]
        if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.shape[-1] == model.image_size:
            images.append(normalize_batch(image[None])[0])
        else:
            images.append(transform(image))
        captions.append(item["captions"] if isinstance(item["captions"], str) else item["captions"][0])
    return torch.stack(images), tokenizer(captions)


@torch.no_grad()
def embed_pairs(model: CLIP, images: torch.Tensor, ids: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """[N, 2d]: each sample's normalized image and text embeddings side by side (what the stages cluster)."""
    was = model.training
    model.eval()
    out = [torch.cat([model.encode_image(images[i:i + batch]), model.encode_text(ids[i:i + batch])], dim=-1)
           for i in range(0, len(images), batch)]
    model.train(was)
    return torch.cat(out).float()


def refine_labels(labels: torch.Tensor, assign: torch.Tensor, clusters: int) -> torch.Tensor:
    """Accumulated pseudo-labels: samples share the new label iff they shared the old one and the new cluster
    (renumbered 0..M-1 in order of first appearance of each pair)."""
    _, new = torch.unique(labels * clusters + assign, return_inverse=True)
    return new


def ffn_parameters(model: CLIP, towers: tuple[str, ...], layers: int | None) -> list[torch.nn.Parameter]:
    """The parameters of the FFNs that will be upcycled (every other parameter stays frozen in a stage)."""
    params = []
    for tower, indices in moe_layers(model, MoEConfig(2, 1, tuple(towers), layers)).items():
        blocks = (model.visual if tower == "vision" else model.text).transformer.blocks
        for i in indices:
            params += list(blocks[i].mlp.parameters())
    return params


def train_stage(dense: CLIP, images: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, cfg: MultipletConfig,
                stage: int) -> CLIP:
    """A copy of ``dense`` whose upcycled FFNs were fine-tuned for ``cfg.stage_steps`` steps with the CLIP loss on
    batches drawn from one pseudo-label at a time (module docstring); nothing else changes."""
    model = copy.deepcopy(dense).train()
    for p in model.parameters():
        p.requires_grad_(False)
    params = ffn_parameters(model, cfg.towers, cfg.layers)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + stage)
    sizes = torch.bincount(labels).float()
    usable = sizes >= 2  # a batch of one has no negative
    if not usable.any():
        raise ValueError(f"multiplet stage {stage}: every pseudo-label holds a single sample; use fewer clusters "
                         "or a larger train_size")
    weights = sizes * usable
    for step in range(cfg.stage_steps):
        label = int(torch.multinomial(weights, 1, generator=g))
        members = torch.nonzero(labels == label).flatten()
        pick = members[torch.randperm(len(members), generator=g)[: cfg.batch_size]]
        out = model(images[pick], ids[pick])
        loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 0 or step + 1 == cfg.stage_steps:
            log.info("multiplet stage %d step %d/%d: loss %.4f (label %d of %d samples)", stage, step + 1,
                     cfg.stage_steps, float(loss.detach()), label, len(members))
    return model.eval()


def diversified_multiplet(dense: CLIP, cfg: MultipletConfig) -> tuple[MoECLIP, list[torch.Tensor]]:
    """(the upcycled CLIP-MoE, the accumulated pseudo-labels after each stage). Expert 0 is ``dense``'s FFN; with
    ``cfg.stage_steps`` > 0 experts 1..E-1 come from the multiplet stages, otherwise they are copies of it."""
    moe_layers(dense, MoEConfig(cfg.experts, cfg.top_k, tuple(cfg.towers), cfg.layers))  # clear errors first
    dense = dense.eval()
    if cfg.stage_steps == 0:
        return upcycle(dense, cfg.experts, cfg.top_k, tuple(cfg.towers), cfg.layers), []
    images, ids = _load_pairs(dense, cfg)
    labels = torch.zeros(len(images), dtype=torch.long)
    donors, history = [dense], []
    for stage in range(1, cfg.experts):
        _, assign = kmeans(embed_pairs(donors[-1], images, ids), cfg.clusters, seed=cfg.seed + stage)
        labels = refine_labels(labels, assign, cfg.clusters)
        history.append(labels.clone())
        log.info("multiplet stage %d: %d pseudo-labels over %d samples", stage, int(labels.max()) + 1, len(labels))
        donors.append(train_stage(dense, images, ids, labels, cfg, stage))
    torch.manual_seed(cfg.seed)  # the routers' initialization
    return upcycle(dense, cfg.experts, cfg.top_k, tuple(cfg.towers), cfg.layers, donors=donors), history
