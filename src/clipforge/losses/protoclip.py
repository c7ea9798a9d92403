"""ProtoCLIP: prototype-level discrimination with Prototypical Back Translation (Chen et al.,
"ProtoCLIP: Prototypical Contrastive Language Image Pretraining", TNNLS 2023).

Representation grouping. Training runs in episodes: the (detached) image and text features
of the last ``memory_size`` samples are kept, and at the end of each episode each modality
is clustered separately into K prototypes with k-means (``kmeans.py``): image centroids
C^I_k with labels a^I_j, text centroids C^T_k with labels a^T_j. The prototypes are buffers
of the term, so they are checkpointed with it.

Prototype-level discrimination across modalities: image i must predict the cluster of its
own caption, caption i the cluster of its own image. A batch sample's label is its nearest
centroid (a^T_i for the caption, a^I_i for the image), which is what k-means assigns.

Prototypical Back Translation (PBT): a text prototype is not compared with image features
directly (the modality gap would dominate); it is re-expressed in image space as the mean
image feature of the samples whose *caption* fell in that text cluster, and vice versa:

    P^{T->I}_k = mean{ x_j : a^T_j = k },      P^{I->T}_k = mean{ y_j : a^I_j = k }

(over the episode memory; clusters without members are left out of the softmax). With
temperature tau, the image -> text-prototype distribution is softmax_k(x_i·P^{T->I}_k / tau)
and the loss is the cross-entropy to a target q_i:

    L = 1/2 [ mean_i CE(q^T_i, softmax_k(x_i·P^{T->I}_k / tau))
            + mean_i CE(q^I_i, softmax_k(y_i·P^{I->T}_k / tau)) ]

with one-hot targets q^T_i = onehot(a^T_i) (``target_temperature <= 0``) or the paper's
smoothed ones, q^T_i = softmax_k(C^T_{a^T_i}·C^T_k / tau_t), the similarity of the teacher's
centroid to the other centroids. ``back_translation=False`` compares with the other
modality's centroids directly (P^{T->I} = C^T), the ablation without PBT.

Gradients reach the features only: prototypes and targets are constants of the episode.
The paper's separate projection head and learnable prototype temperature belong to the
model; point ``image_key``/``text_key`` at such head outputs in ``LossInputs.extra`` to use
them, and pass ``temperature`` as the fixed tau. Combine with the instance loss:
``{clip: 1.0, protoclip: 1.0}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .gather import gather
from .kmeans import kmeans, nearest
from .registry import register
from .validate import parse_options


@dataclass
class ProtoClipConfig:
    num_prototypes: int = 16  # K, per modality
    memory_size: int = 4096  # samples per episode: the features that are clustered
    kmeans_iters: int = 20
    temperature: float = 0.05  # tau of the prototype softmax
    target_temperature: float = 0.0  # tau_t of the smoothed targets; <= 0: one-hot targets
    back_translation: bool = True  # PBT; False: compare with the other modality's centroids
    update: bool = True  # False: keep the current prototypes (no memory, no re-clustering)
    image_key: str = "image_features"
    text_key: str = "text_features"

    def __post_init__(self):
        if self.num_prototypes < 1 or self.memory_size < self.num_prototypes:
            raise ValueError(f"protoclip needs 1 <= num_prototypes <= memory_size, got num_prototypes="
                             f"{self.num_prototypes}, memory_size={self.memory_size}; raise memory_size")
        if self.temperature <= 0:
            raise ValueError(f"protoclip temperature must be > 0, got {self.temperature}")


class Prototypes(NamedTuple):
    """One episode's clustering: centroids, back-translated prototypes and which clusters have members."""

    image_centroids: Tensor  # C^I [K, d]
    text_centroids: Tensor  # C^T [K, d]
    image_from_text: Tensor  # P^{T->I} [K, d]: text clusters expressed in image space
    text_from_image: Tensor  # P^{I->T} [K, d]
    text_present: Tensor  # [K] bool: text clusters with members
    image_present: Tensor  # [K] bool


def back_translate(labels: Tensor, paired: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """PBT: the mean of ``paired`` features over the members of each cluster of ``labels``; and which are non-empty."""
    sums = torch.zeros(k, paired.shape[1], dtype=paired.dtype, device=paired.device).index_add_(0, labels, paired)
    counts = torch.bincount(labels, minlength=k)
    return sums / counts.clamp(min=1)[:, None].to(paired.dtype), counts > 0


def build_prototypes(memory_image: Tensor, memory_text: Tensor, k: int, iters: int = 20, seed: int = 0) -> Prototypes:
    """Cluster each modality of an episode (paired rows) and back-translate the clusters across modalities."""
    c_img, a_img = kmeans(memory_image, k, iters, seed)
    c_txt, a_txt = kmeans(memory_text, k, iters, seed + 1)
    img_from_txt, has_txt = back_translate(a_txt, memory_image, k)
    txt_from_img, has_img = back_translate(a_img, memory_text, k)
    return Prototypes(c_img, c_txt, img_from_txt, txt_from_img, has_txt, has_img)


def prototype_targets(labels: Tensor, teacher_centroids: Tensor, present: Tensor, target_temperature: float) -> Tensor:
    """One-hot targets, or softmax over the present clusters of the teacher centroid's similarity to the others."""
    if target_temperature <= 0:
        return F.one_hot(labels, teacher_centroids.shape[0]).to(teacher_centroids.dtype)
    sims = teacher_centroids[labels] @ teacher_centroids.t() / target_temperature
    return torch.softmax(sims.masked_fill(~present, float("-inf")), dim=-1)


def prototype_discrimination(student: Tensor, prototypes: Tensor, present: Tensor, targets: Tensor,
                             temperature: float) -> Tensor:
    """mean_i CE(targets_i, softmax over present clusters of student_i·prototypes / temperature)."""
    logp = (student @ prototypes.t() / temperature).masked_fill(~present, float("-inf")).log_softmax(-1)
    return -torch.where(targets > 0, targets * logp, torch.zeros_like(logp)).sum(-1).mean()


def protoclip_loss(image_features: Tensor, text_features: Tensor, prototypes: Prototypes, temperature: float = 0.05,
                   target_temperature: float = 0.0, back_translation: bool = True) -> Tensor:
    """The ProtoCLIP loss of a batch given one episode's prototypes (see the module docstring)."""
    p = Prototypes(*(t.to(image_features.dtype) if t.is_floating_point() else t for t in prototypes))
    # a^T_i, a^I_i: the nearest centroid among the clusters that have members in the episode
    text_labels = nearest(text_features.detach(), p.text_centroids, p.text_present)
    image_labels = nearest(image_features.detach(), p.image_centroids, p.image_present)
    img_protos = p.image_from_text if back_translation else p.text_centroids
    txt_protos = p.text_from_image if back_translation else p.image_centroids
    q_text = prototype_targets(text_labels, p.text_centroids, p.text_present, target_temperature)
    q_image = prototype_targets(image_labels, p.image_centroids, p.image_present, target_temperature)
    return 0.5 * (prototype_discrimination(image_features, img_protos, p.text_present, q_text, temperature)
                  + prototype_discrimination(text_features, txt_protos, p.image_present, q_image, temperature))


@register("protoclip")
class ProtoClipLoss(nn.Module):
    """Registered ProtoCLIP term: episodic memory, k-means prototypes (buffers), :func:`protoclip_loss`.

    Options are the fields of :class:`ProtoClipConfig`. Every process stores the gathered
    (global) batch, so all processes cluster the same features and hold the same prototypes;
    the loss itself is per sample given the prototypes. Until the first clustering (fewer
    than K samples seen) the loss is zero and ``ready`` logs 0. The memory advances on every
    call in training mode: a loop that evaluates the loss several times per optimizer step
    (``clipforge train`` with ``accum_steps > 1`` recomputes the full-batch loss once per
    micro-batch) stores each batch that many times, so train this term with ``accum_steps=1``.
    """

    BUFFERS = ("memory_image", "memory_text", "image_centroids", "text_centroids", "image_from_text",
               "text_from_image", "text_present", "image_present")

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(ProtoClipConfig, options, "protoclip")
        defaults = ("image_features", "text_features")
        self.extra_keys = tuple(k for k in (self.cfg.image_key, self.cfg.text_key) if k not in defaults)
        for name in self.BUFFERS:
            self.register_buffer(name, torch.zeros(0))
        # filled rows, write position, samples since the last clustering, clusterings so far (the k-means seed)
        self.register_buffer("counters", torch.zeros(4, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.BUFFERS:  # buffers are sized at the first batch: adopt the checkpoint's shapes
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.counters.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _remember(self, img: Tensor, txt: Tensor) -> None:
        size = self.cfg.memory_size
        if self.memory_image.numel() == 0:
            self.memory_image = img.new_zeros(size, img.shape[1], dtype=torch.float32)
            self.memory_text = txt.new_zeros(size, txt.shape[1], dtype=torch.float32)
        img, txt = img[-size:], txt[-size:]
        filled, ptr, since, runs = self.counters.tolist()
        rows = (ptr + torch.arange(img.shape[0], device=img.device)) % size
        self.memory_image[rows] = img.float()
        self.memory_text[rows] = txt.float()
        filled, ptr, since = min(size, filled + img.shape[0]), (ptr + img.shape[0]) % size, since + img.shape[0]
        if (self.image_centroids.numel() == 0 and filled >= self.cfg.num_prototypes) or since >= size:
            protos = build_prototypes(self.memory_image[:filled], self.memory_text[:filled], self.cfg.num_prototypes,
                                      self.cfg.kmeans_iters, seed=2 * runs)
            for name, value in zip(Prototypes._fields, protos):
                setattr(self, name, value)
            since, runs = 0, runs + 1
        self.counters = torch.tensor([filled, ptr, since, runs], device=self.counters.device)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        img, txt = inputs.require(self.cfg.image_key), inputs.require(self.cfg.text_key)
        if self.training and self.cfg.update:
            with torch.no_grad():
                self._remember(gather(img.detach(), inputs.rank, inputs.world_size),
                               gather(txt.detach(), inputs.rank, inputs.world_size))
        if self.image_centroids.numel() == 0:
            return {"loss": 0.0 * (img.sum() + txt.sum()), "ready": img.new_zeros(())}
        protos = Prototypes(*(getattr(self, name) for name in Prototypes._fields))
        loss = protoclip_loss(img, txt, protos, self.cfg.temperature, self.cfg.target_temperature,
                              self.cfg.back_translation)
        return {"loss": loss, "ready": img.new_ones(())}
