"""GRAIN: region descriptions grounded in predicted image regions, beside the global caption objective.

"Grounding Descriptions in Images informs Zero-Shot Visual Recognition" (GRAIN, 2024), Sec. 3:
besides CLIP's image-caption contrast (add ``clip`` beside this term), the image tower emits Q region
tokens, each with a predicted box and a region embedding; predictions are matched one-to-one to the
annotated regions (boxes with their descriptions) by bipartite matching on the box cost, as in DETR;
the matched region embeddings are contrasted with every description of the batch, and the matched
boxes regress to the annotated ones. With e_q / b_q the embedding and box of region token q of image i,
sigma_i the matching, u_j and b_j the description embedding and box of annotated region j, M the valid
regions of the (gathered) batch and t the logit scale:

    sigma_i = argmin_sigma sum_{j in M_i} C(b_{sigma(j)}, b_j),   C(b, b') = ||b - b'||_1 + 1 - GIoU(b, b')
    L_desc  = 1/|M| sum_{j in M} -log softmax_{k in M}(t e_{sigma(j)} . u_k)[j]
    L_box   = 1/|M| sum_{j in M} C(b_{sigma(j)}, b_j)

    loss = desc * L_desc + box * L_box

Simplifications, stated: the region tokens are a light decoder owned by this term (Q learned queries,
one transformer decoder layer cross-attending to the image tower's projected patch tokens, a box MLP
and an embedding projection), trained with the model, instead of extra tokens inside the ViT; it is
saved with the loss terms' state, so the trained model file holds the global model only; GRAIN's test-time
description scoring reads the region tokens back from a checkpoint (:mod:`clipforge.evaluation.descriptions`).
Descriptions are the dataset's region captions (``shapes``: "a small red circle.") instead of an
MLLM's; boxes are the dataset's instead of an open-vocabulary detector's. The matching is exact
(every assignment is scored; Q <= 6 keeps that cheap), on the box cost alone as in GRAIN's code.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossInputs
from .cloc import gather_regions, generalized_iou
from .registry import register
from .validate import parse_options

MAX_QUERIES = 6  # exact matching enumerates Q! / (Q - R)! assignments


def in_dtype(module: nn.Module, dtype: torch.dtype, *args):
    """``module(*args)`` with its parameters cast to ``dtype`` (gradients flow back to them): a loss term's head
    runs in the features' dtype (float64 in the tests, float32 in training)."""
    params = {name: p.to(dtype) for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, args)


def box_cost(pred: Tensor, true: Tensor) -> Tensor:
    """C(b, b') = ||b - b'||_1 + 1 - GIoU(b, b') of every prediction [Q, 4] with every box [R, 4] -> [Q, R]."""
    p, t = pred[:, None].expand(-1, true.shape[0], -1), true[None].expand(pred.shape[0], -1, -1)
    return (p - t).abs().sum(-1) + 1 - generalized_iou(p, t)


def match(cost: Tensor) -> Tensor:
    """The query index assigned to each of the R columns of ``cost`` [Q, R] (Q >= R) with the least total cost,
    found by scoring every assignment (exact; small Q)."""
    q, r = cost.shape
    if r == 0:
        return torch.zeros(0, dtype=torch.long, device=cost.device)
    perms = torch.tensor(list(itertools.permutations(range(q), r)), dtype=torch.long, device=cost.device)
    totals = cost[perms, torch.arange(r, device=cost.device)].sum(-1)
    return perms[int(totals.argmin())]


def grain_loss(region_embeddings: Tensor, predicted_boxes: Tensor, region_text_features: Tensor,
               region_boxes: Tensor, region_mask: Tensor, logit_scale, desc: float = 1.0, box: float = 1.0,
               rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
    """GRAIN's region terms (module docstring). ``region_embeddings`` [B, Q, d] normalized and
    ``predicted_boxes`` [B, Q, 4] xyxy are the region tokens'; the descriptions [B, R, d], boxes [B, R, 4]
    and mask [B, R] the annotated regions'. Descriptions are gathered across processes."""
    b, q, d = region_embeddings.shape
    mask = region_mask.bool()
    if int(mask.sum(1).max()) > q:
        raise ValueError(f"grain has {q} region tokens but a sample has {int(mask.sum(1).max())} regions; set the "
                         f"grain option queries to at least data's max regions per sample")
    (u_all,), m_all, n, positions = gather_regions((region_text_features,), mask, rank, world_size, "grain")
    rows, targets, preds, trues = [], [], [], []
    for i in range(b):
        cols = torch.nonzero(mask[i]).reshape(-1)
        if cols.numel() == 0:
            continue
        with torch.no_grad():
            assigned = match(box_cost(predicted_boxes[i].float(), region_boxes[i, cols].float()))
        rows.append(region_embeddings[i, assigned])
        targets.append(positions[(rank * b + i) * mask.shape[1] + cols])
        preds.append(predicted_boxes[i, assigned])
        trues.append(region_boxes[i, cols].to(predicted_boxes.dtype))
    if rows:
        e, t = torch.cat(rows), torch.cat(targets)
        l_desc = F.cross_entropy(logit_scale * e @ u_all[m_all].t(), t, reduction="sum") * world_size / n
        p, tb = torch.cat(preds), torch.cat(trues)
        l_box = ((p - tb).abs().sum(-1) + 1 - generalized_iou(p, tb)).sum() * world_size / n
    else:  # this process holds no region: it contributes nothing, gradients still reach its inputs as zeros
        l_desc = l_box = region_embeddings.sum() * 0.0 + predicted_boxes.sum() * 0.0 + u_all.sum() * 0.0
    return {"loss": desc * l_desc + box * l_box, "desc": l_desc.detach(), "box": l_box.detach()}


class RegionTokens(nn.Module):
    """GRAIN's region tokens as a light decoder: Q learned queries, one decoder layer (self-attention, then
    cross-attention to the patch tokens [B, N, d]) -> region embeddings [B, Q, d] (normalized) and boxes
    [B, Q, 4] (sigmoid (cx, cy, w, h) returned as xyxy)."""

    def __init__(self, dim: int, queries: int, heads: int, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # the same initial head on every process, the global RNG untouched
            torch.manual_seed(seed)
            self.queries = nn.Parameter(torch.randn(queries, dim) * 0.02)
            self.layer = nn.TransformerDecoderLayer(dim, heads if dim % heads == 0 else 1, 2 * dim, dropout=0.0,
                                                    batch_first=True, norm_first=True)
            self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
            self.box = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 4))

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        x = self.layer(self.queries.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens)
        cxcywh = torch.sigmoid(self.box(x))
        half = cxcywh[..., 2:] / 2
        return F.normalize(self.embed(x), dim=-1), torch.cat([cxcywh[..., :2] - half, cxcywh[..., :2] + half], -1)


@dataclass
class GrainConfig:
    embed_dim: int = 128  # the model's embedding dimension (tiny's; ViT-B-32: 512); a mismatch fails at step 1
    queries: int = 4  # Q region tokens per image: at least the regions of a sample (data: up to 4)
    heads: int = 4
    desc: float = 1.0  # weight of the description-region contrast
    box: float = 1.0  # weight of the box regression (L1 + 1 - GIoU)
    seed: int = 0  # initialization of the region tokens

    def __post_init__(self):
        if not 1 <= self.queries <= MAX_QUERIES:
            raise ValueError(f"grain queries must be in [1, {MAX_QUERIES}], got {self.queries}")
        if self.embed_dim < 1 or self.heads < 1:
            raise ValueError(f"grain embed_dim and heads must be >= 1, got {self.embed_dim} and {self.heads}")
        if self.desc < 0 or self.box < 0 or self.desc + self.box == 0:
            raise ValueError(f"grain's desc and box weights must be >= 0 and not both 0, got desc={self.desc}, "
                             f"box={self.box}")


@register("grain")
class GrainLoss(nn.Module):
    """Registered :func:`grain_loss` with its region tokens (:class:`RegionTokens`, trained with the model);
    options :class:`GrainConfig`. Reads the projected patch tokens and the region captions and boxes."""

    extra_keys = ("image_tokens", "region_text_features")

    def __init__(self, **options):
        super().__init__()
        self.cfg = parse_options(GrainConfig, options, "grain")
        self.tokens = RegionTokens(self.cfg.embed_dim, self.cfg.queries, self.cfg.heads, self.cfg.seed)

    def forward(self, inputs: LossInputs) -> dict[str, Tensor]:
        patches = inputs.require("image_tokens")
        if patches.shape[-1] != self.cfg.embed_dim:
            raise ValueError(f"grain was built for embed_dim={self.cfg.embed_dim} but the patch tokens have "
                             f"{patches.shape[-1]} dimensions: set the grain option embed_dim={patches.shape[-1]}")
        texts, boxes = inputs.require("region_text_features"), inputs.require("region_boxes")
        mask = inputs.require("region_mask")
        b_r = tuple(texts.shape[:2])
        if texts.ndim != 3 or tuple(boxes.shape) != (*b_r, 4) or tuple(mask.shape) != b_r:
            raise ValueError(f"grain needs region_text_features [B, R, d], region_boxes [B, R, 4] and region_mask "
                             f"[B, R] of one B and R, got {tuple(texts.shape)}, {tuple(boxes.shape)}, "
                             f"{tuple(mask.shape)}")
        embeddings, predicted = in_dtype(self.tokens, texts.dtype, patches.to(texts.dtype))
        return grain_loss(embeddings, predicted, texts, boxes, mask,
                          inputs.logit_scale, self.cfg.desc, self.cfg.box, inputs.rank, inputs.world_size)
