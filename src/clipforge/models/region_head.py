"""CLOC's promptable region head (the "Prompter"): box prompt + patch tokens -> region embedding.

Chen et al., "Contrastive Localized Language-Image Pre-training" (CLOC, 2024), Sec. 3: the image
encoder's patch tokens become *promptable embeddings*; a light Prompter turns them plus a spatial
hint into a region representation. For a box prompt b the Prompter is

    r(b) = W_out LN( T([q; RoIAlign(P, b) + PE(b)])_0 )

with P the [g, g, d] grid of projected patch tokens, RoIAlign sampling an s x s grid of bilinear
points inside b (:func:`roi_align`), PE(b) a learned embedding of the box coordinates, q a learned
query token and T one pre-norm transformer layer; the output at the query is the region embedding.
For the grounding objective (text -> box) the caption embedding t is the prompt instead:

    b_hat(t) = sigmoid(MLP( T'([W_t t; P + PE_grid])_0 ))   as (cx, cy, w, h), returned as xyxy

Simplifications, stated: one transformer layer each (the paper's Prompter is a light transformer,
its depth not fixed here), one bilinear sample per RoI bin (RoIAlign with sampling_ratio=1), the
region embedding lives in the joint space (d = embed_dim) so it is compared with text directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class RegionHeadConfig:
    roi_size: int = 2  # s: the s x s bilinear samples RoIAlign takes inside each box
    heads: int = 4
    mlp_ratio: float = 2.0

    def __post_init__(self):
        if self.roi_size < 1 or self.heads < 1 or self.mlp_ratio <= 0:
            raise ValueError(f"region head needs roi_size >= 1, heads >= 1, mlp_ratio > 0; got {self}")


def check_boxes(boxes: Tensor, batch: int) -> None:
    """``boxes`` must be [B, R, 4] normalized xyxy with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1."""
    if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, R, 4] (normalized x0, y0, x1, y1) with B = {batch}, "
                         f"got {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all() or (boxes < 0).any() or (boxes > 1).any():
        raise ValueError("boxes lie outside the image; give normalized coordinates in [0, 1] "
                         "(divide pixel coordinates by the image width/height)")
    if (boxes[..., 2] <= boxes[..., 0]).any() or (boxes[..., 3] <= boxes[..., 1]).any():
        raise ValueError("a box is empty; every box needs x1 > x0 and y1 > y0 (x0, y0 is the top-left corner)")


def roi_align(tokens: Tensor, boxes: Tensor, size: int) -> Tensor:
    """RoIAlign over a square patch grid: tokens [B, g*g, C] (row-major), boxes [B, R, 4] normalized xyxy
    -> [B, R, size*size, C]. Bin (i, j) of a box is sampled bilinearly at its center
    ``(x0 + (j + 0.5) (x1 - x0) / size, y0 + (i + 0.5) (y1 - y0) / size)``, with patch k's feature at
    the patch center ((k + 0.5) / g) and the border patch's value beyond it."""
    b, n, c = tokens.shape
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"roi_align needs a square patch grid, got {n} tokens")
    grid = tokens.transpose(1, 2).reshape(b, c, g, g)
    steps = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) / size
    xs = boxes[..., 0:1] + steps * (boxes[..., 2:3] - boxes[..., 0:1])  # [B, R, s]
    ys = boxes[..., 1:2] + steps * (boxes[..., 3:4] - boxes[..., 1:2])
    points = torch.stack([xs[:, :, None, :].expand(-1, -1, size, -1), ys[:, :, :, None].expand(-1, -1, -1, size)], -1)
    points = points.reshape(b, boxes.shape[1], size * size, 2) * 2 - 1  # [-1, 1], align_corners=False convention
    out = F.grid_sample(grid, points.to(grid.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1)  # [B, R, s*s, C]


class RegionHead(nn.Module):
    """The Prompter (module docstring) over projected patch tokens of width ``dim`` (= embed_dim)."""

    def __init__(self, dim: int, grid: int, cfg: RegionHeadConfig = RegionHeadConfig()):
        super().__init__()
        self.cfg, self.grid = cfg, grid
        heads = cfg.heads if dim % cfg.heads == 0 else 1
        ff = int(dim * cfg.mlp_ratio)
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.box_embed = nn.Linear(4, dim)
        self.layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)
        # grounding: caption embedding -> box
        self.text_in = nn.Linear(dim, dim)
        self.grid_pos = nn.Parameter(torch.randn(grid * grid, dim) * 0.02)
        self.ground_layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.box_mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 4))

    def forward(self, tokens: Tensor, boxes: Tensor) -> Tensor:
        """Region embeddings [B, R, d] (unnormalized) of boxes [B, R, 4] over patch tokens [B, N, d]."""
        check_boxes(boxes, tokens.shape[0])
        b, r = boxes.shape[:2]
        pooled = roi_align(tokens, boxes, self.cfg.roi_size)  # [B, R, s*s, d]
        seq = pooled + self.box_embed(boxes.to(pooled.dtype))[:, :, None]
        seq = torch.cat([self.query.expand(b * r, 1, -1), seq.reshape(b * r, -1, seq.shape[-1])], dim=1)
        return self.out(self.norm(self.layer(seq)[:, 0])).view(b, r, -1)

    def ground(self, tokens: Tensor, texts: Tensor) -> Tensor:
        """Boxes [B, R, 4] (normalized xyxy) that captions' embeddings texts [B, R, d] point to in their
        image's patch tokens [B, N, d]."""
        b, r, d = texts.shape
        patches = (tokens + self.grid_pos).repeat_interleave(r, dim=0)  # [B*R, N, d]
        seq = torch.cat([self.text_in(texts.reshape(b * r, 1, d).to(tokens.dtype)), patches], dim=1)
        cxcywh = torch.sigmoid(self.box_mlp(self.ground_layer(seq)[:, 0])).view(b, r, 4)
        half = cxcywh[..., 2:] / 2
        return torch.cat([cxcywh[..., :2] - half, cxcywh[..., :2] + half], dim=-1)
