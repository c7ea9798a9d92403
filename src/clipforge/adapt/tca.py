"""TCA: token condensation as training-free test-time adaptation.

Wang, Gong, Wang, Huang and Luo, "Is Less More? Exploring Token Condensation as Training-free
Test-time Adaptation" (arXiv 2410.14729, ICCV 2025; official code github.com/Jo-wang/TCA). The
frozen image tower classifies a stream of unlabelled test images, one batch at a time, and

1. **condenses tokens** at a few blocks (the paper: blocks 3, 6 and 9 of ViT-B/16, i.e. at 1/4,
   1/2 and 3/4 of the depth). After the block's attention, patch token i gets the score
   ``a_i = mean_h softmax_j(q_cls,h . k_j,h / sqrt(d_h))[i]``: the class token's attention to it,
   averaged over heads (``score="attention"``, what the official code ranks by), or the mean over
   heads of its rank position (``score="rank"``, the paper's "cross-head consensus": a token
   pruned only if it ranks low in every head). Tokens are sorted by score; the top ones stay as
   they are, the next ("class-ambiguous") ones are **merged** into ``merge_centers`` coreset
   centers and the lowest ("class-irrelevant") ones are **pruned**: dropped (``mode="prune"``),
   or, in ``mode="merge"`` (TCA), fused into one token ``x_f = sum_i a_i x_i / sum_i a_i`` (EViT's
   inattentive-token fusion). The block's MLP then runs on the condensed sequence.
2. keeps a **domain-aware token reservoir** (DTR): per predicted class, the class-token trajectory
   ``c(x) = [cls after block 0, ..., cls after block L-1]`` of at most ``reservoir_size`` test
   images, those with the lowest prediction entropy. When a class overflows, the entry with the
   largest ``H(x) + diversity_weight * mean_{x' != x} cos(cbar(x), cbar(x'))`` leaves (``cbar``:
   the mean over layers), so confident *and* mutually different samples stay (the official
   ``--div`` rule).
3. uses the reservoir's per-class mean class tokens as **domain anchor tokens**: at a
   condensation block l, the anchor of the class whose mean class token (at the block's input)
   is most cosine-similar to the image's own class token is prepended to the sequence for that
   block's attention (as query, key and value; its output is discarded), so the attention that
   ranks the tokens, and the tokens themselves, see what confident test images of that domain
   looked like (the official code's mechanism).
4. **corrects the logits** with the reservoir as a token-level cache (a Tip-Adapter-style
   classifier on class tokens): ``affinity_m = sum_l w_l cos(c_l(x), c_l(r_m))`` with
   ``w_l ∝ exp(l / ((L - 1) * layer_temperature))`` (later blocks weigh more) and
   ``logits = s * f W^T + lambda * exp(-beta (1 - affinity)) Y``, Y the reservoir entries'
   one-hot predicted classes.

Where this departs from the official code, and why:

- **Token counts.** The official block keeps ``ceil((1 - R)(N - 1)) - 2m`` tokens, merges the
  next ``2m`` into 4 centers and fuses the rest (``m = N - ceil((1 - R)(N - 1))``), which leaves
  fewer tokens than ``1 - R`` suggests and fails for ``R`` above about 1/3. Here ``keep_ratio``
  is exactly the fraction of patch tokens (merged tokens included) that leave a condensation
  block, ``ceil(keep_ratio * n)``, the same in both modes, so prune and merge cost the same.
  The non-kept tokens split ``merge_share`` (default 2/3, the official 2m : m proportion)
  into the coreset clusters, the rest into the fused token.
- **Merging.** Tokens carry a size (how many patches they stand for). A coreset cluster becomes
  the size-weighted mean of its members, so ``sum_j s_j x_j`` and ``sum_j s_j`` are conserved
  (ToMe's rule); the official code weights members by inverse distance to the center. The
  fused token's weights are normalized to sum to 1 (the official EViT-style sum is not
  normalized, shrinking the token by ``sum_i a_i``). Centers come from greedy k-center
  selection started at the highest-scored ambiguous token (the official code's k-center greedy
  starts elsewhere).
- **Batches.** The official runner streams one image at a time and corrects an image's logits
  after inserting it into the reservoir (so it always matches itself). Here a batch is
  classified with the reservoir and anchors as they stood before it, then its images enter the
  reservoir in order; with ``batch_size=1`` this is "correct, then insert".
- Anchors are used once every class holds ``anchor_min_samples`` entries (the official
  condition, with 2); before that the stream runs unanchored. The entropy and the reservoir's
  predicted class come from the condensed model's uncorrected logits (as in the official code).
- Only towers with a class token are supported (SigLIP-style towers have none to rank by).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.config import VisionConfig
from ..models.vision import VisionTransformer


@dataclass
class TCAConfig:
    """Options of :class:`TCA`.

    ``layers``: blocks (0-based) whose output is condensed; None: blocks floor(L/4), floor(L/2)
    and floor(3L/4) of L (3, 6, 9 of 12, the paper's). ``keep_ratio``: fraction of the patch tokens that leave
    each condensation block (1.0: no condensation). ``mode``: ``merge`` (TCA: coreset-merge the
    ambiguous tokens, fuse the rest) or ``prune`` (drop everything below the top ``keep_ratio``).
    ``merge_centers``: coreset centers per condensation block; ``merge_share``: the part of the
    non-kept tokens merged into them (the rest is fused into one token). ``score``: rank tokens by
    head-mean class-token attention or by head-mean rank (cross-head consensus). ``anchors``: guide
    condensation with the reservoir's domain anchor tokens. ``reservoir_size``: entries per class;
    ``diversity_weight``: weight of the similarity term in the eviction score (0: pure entropy).
    ``correction_weight`` (lambda), ``beta`` and ``layer_temperature``: the reservoir logits
    ``lambda * exp(-beta (1 - affinity))``; 0 turns the correction off. Defaults: the official
    ImageNet config (reservoir 3, lambda 3, beta 5, scale 0.1)."""

    layers: tuple[int, ...] | None = None
    keep_ratio: float = 0.7
    mode: Literal["merge", "prune"] = "merge"
    merge_centers: int = 4
    merge_share: float = 2 / 3
    score: Literal["attention", "rank"] = "attention"
    anchors: bool = True
    anchor_min_samples: int = 2
    reservoir_size: int = 3
    diversity_weight: float = 1.0
    correction_weight: float = 3.0
    beta: float = 5.0
    layer_temperature: float = 0.1

    def __post_init__(self):
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.mode not in ("merge", "prune"):
            raise ValueError(f"mode must be 'merge' or 'prune', got {self.mode!r}")
        if self.score not in ("attention", "rank"):
            raise ValueError(f"score must be 'attention' or 'rank', got {self.score!r}")
        if self.merge_centers < 0:
            raise ValueError(f"merge_centers must be >= 0, got {self.merge_centers}")
        if not 0.0 <= self.merge_share <= 1.0:
            raise ValueError(f"merge_share must be in [0, 1], got {self.merge_share}")
        if self.reservoir_size < 1 or self.anchor_min_samples < 1:
            raise ValueError("reservoir_size and anchor_min_samples must be >= 1")
        if self.correction_weight < 0 or self.layer_temperature <= 0:
            raise ValueError("correction_weight must be >= 0 and layer_temperature > 0")
        if self.layers is not None:
            self.layers = tuple(sorted(set(int(i) for i in self.layers)))

    def condensation_layers(self, depth: int) -> tuple[int, ...]:
        """The 0-based blocks that condense tokens in a tower of ``depth`` blocks."""
        layers = self.layers if self.layers is not None else tuple(sorted({int(depth * f) for f in (0.25, 0.5, 0.75)}))
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"condensation layers {bad} are outside the tower's blocks 0..{depth - 1}")
        return tuple(layers)


# ------------------------------------------------------------------------------ token schedule
@dataclass(frozen=True)
class CondensePlan:
    """How a condensation block splits its ``n`` patch tokens (ranked by score, best first):
    the top ``as_is`` stay, the next ``ambiguous`` become ``centers`` coreset tokens, the last
    ``fused`` become one token (merge mode) or vanish (prune mode). ``out``: tokens after."""

    n: int
    out: int
    as_is: int
    ambiguous: int
    centers: int
    fused: int


def plan_condensation(n: int, cfg: TCAConfig) -> CondensePlan:
    """The split of ``n`` patch tokens at one condensation block (see :class:`CondensePlan`)."""
    out = max(1, math.ceil(cfg.keep_ratio * n - 1e-9))
    if out >= n:
        return CondensePlan(n, n, n, 0, 0, 0)
    if cfg.mode == "prune":
        return CondensePlan(n, out, out, 0, 0, n - out)
    centers = max(0, min(cfg.merge_centers, out - 1))
    as_is = out - centers - 1  # one slot for the fused token
    rest = n - as_is  # > centers, since n > out
    ambiguous = min(max(round(cfg.merge_share * rest), centers), rest - 1) if centers else 0
    return CondensePlan(n, out, as_is, ambiguous, centers, rest - ambiguous)


def token_schedule(vision: VisionConfig, cfg: TCAConfig, anchored: bool = False) -> list[dict[str, int]]:
    """Tokens per block (class token included): ``attention`` (entering the block's attention,
    plus the anchor when ``anchored``) and ``mlp`` (entering its MLP, after any condensation)."""
    if not vision.class_token:
        raise ValueError("TCA needs a class token (its attention ranks the tokens); this tower has none")
    n = (vision.image_size // vision.patch_size) ** 2
    layers = set(cfg.condensation_layers(vision.layers))
    rows = []
    for i in range(vision.layers):
        if i in layers:
            plan = plan_condensation(n, cfg)
            cond = plan.out < n
            rows.append({"attention": n + 1 + int(anchored and cond and i > 0), "mlp": plan.out + 1})
            n = plan.out
        else:
            rows.append({"attention": n + 1, "mlp": n + 1})
    return rows


def _block_flops(n_attn: int, n_mlp: int, width: int, hidden: int) -> int:
    """Multiply-adds x 2 of one pre-LN block: qkv and output projections, q.k and attn.v, the MLP
    (LayerNorms, softmax and activations are left out, as fvcore does)."""
    attn = 2 * n_attn * width * 3 * width + 2 * 2 * n_attn * n_attn * width + 2 * n_attn * width * width
    return attn + 2 * 2 * n_mlp * width * hidden


def tca_flops(vision: VisionConfig, cfg: TCAConfig, anchored: bool = False) -> dict[str, float]:
    """GFLOPs of one image through the image tower, plain and with TCA's token schedule, and the
    token x block count of each (the patch embedding counts in both; the pooling head and
    projection, identical in both, are left out). The coreset selection (O(ambiguous^2 x width) per block) and the
    reservoir look-ups are left out (a few percent of one block here)."""
    n = (vision.image_size // vision.patch_size) ** 2
    hidden = int(vision.width * vision.mlp_ratio)
    stem = 2 * n * 3 * vision.patch_size**2 * vision.width  # the patch embedding
    plain_rows = token_schedule(vision, TCAConfig(keep_ratio=1.0))
    rows = token_schedule(vision, cfg, anchored)
    plain = stem + sum(_block_flops(r["attention"], r["mlp"], vision.width, hidden) for r in plain_rows)
    tca = stem + sum(_block_flops(r["attention"], r["mlp"], vision.width, hidden) for r in rows)
    return {"gflops_plain": plain / 1e9, "gflops_tca": tca / 1e9, "saved": 1.0 - tca / plain,
            "token_blocks_plain": sum(r["mlp"] for r in plain_rows), "token_blocks_tca": sum(r["mlp"] for r in rows),
            "tokens_out": [r["mlp"] for r in rows]}


# ------------------------------------------------------------------------------ condensation
def class_token_attention(block, x: Tensor, cls_index: int = 0) -> tuple[Tensor, Tensor]:
    """Run ``block``'s attention on ``x`` [B, N, w] by hand: returns the attention output
    (before the residual) and the class token's attention weights [B, heads, N]."""
    attn = block.attn
    b, n, c = x.shape
    qkv = attn.in_proj(block.ln_1(x)).view(b, n, 3, attn.heads, c // attn.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = torch.softmax((q @ k.transpose(-2, -1)) * (c // attn.heads) ** -0.5, dim=-1)  # [B, H, N, N]
    out = attn.out_proj((weights @ v).transpose(1, 2).reshape(b, n, c))
    return out, weights[:, :, cls_index]


def token_scores(cls_attn: Tensor, score: str) -> Tensor:
    """Importance of each patch token from the class token's attention to it [B, H, n]: the
    head mean (``attention``) or the head mean of its rank, 0 = least attended (``rank``)."""
    if score == "attention":
        return cls_attn.mean(1)
    ranks = torch.argsort(torch.argsort(cls_attn, dim=-1, stable=True), dim=-1, stable=True)
    return ranks.float().mean(1) / max(cls_attn.shape[-1] - 1, 1)


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def kcenter_assign(tokens: Tensor, k: int) -> Tensor:
    """Greedy k-center coreset on ``tokens`` [B, M, w] (the first center is token 0, each next one
    the token farthest from the chosen centers); returns each token's nearest center [B, M]."""
    b, m, _ = tokens.shape
    dist = torch.cdist(tokens.float(), tokens.float())  # [B, M, M]
    centers = torch.zeros(b, k, dtype=torch.long, device=tokens.device)
    nearest = dist[:, 0].clone()
    for j in range(1, k):
        centers[:, j] = nearest.argmax(-1)
        nearest = torch.minimum(nearest, torch.gather(dist, 1, centers[:, j, None, None].expand(-1, 1, m))[:, 0])
    to_centers = torch.gather(dist, 2, centers[:, None, :].expand(-1, m, -1))  # [B, M, k]
    return to_centers.argmin(-1)


def condense(x: Tensor, scores: Tensor, attention: Tensor, sizes: Tensor, plan: CondensePlan,
             mode: str = "merge") -> tuple[Tensor, Tensor, Tensor]:
    """Condense the patch tokens of ``x`` [B, 1 + n, w] (class token first).

    ``scores`` [B, n] rank the tokens (higher is kept), ``attention`` [B, n] (the class token's
    head-mean attention) weights the fused token, ``sizes`` [B, n] are the patches each token
    stands for. Returns the new tokens [B, 1 + out, w] (class token, the kept tokens in their
    original order, then the coreset centers, then the fused token), their sizes [B, out] and the
    indices of the tokens kept as they are [B, as_is]."""
    if plan.out >= plan.n:
        return x, sizes, torch.arange(plan.n, device=x.device).expand(x.shape[0], -1)
    cls, patches = x[:, :1], x[:, 1:]
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    kept = order[:, : plan.as_is].sort(-1).values
    parts, part_sizes = [cls, _gather(patches, kept)], [torch.gather(sizes, 1, kept)]
    if mode == "merge":
        if plan.centers:
            amb = order[:, plan.as_is : plan.as_is + plan.ambiguous]
            xa, sa = _gather(patches, amb), torch.gather(sizes, 1, amb)
            onehot = F.one_hot(kcenter_assign(xa, plan.centers), plan.centers).to(x.dtype) * sa.unsqueeze(
                -1
            )  # [B, M, k]
            mass = onehot.sum(1)  # [B, k]
            parts.append(onehot.transpose(1, 2) @ xa / mass.unsqueeze(-1))
            part_sizes.append(mass)
        fused = order[:, plan.as_is + plan.ambiguous :]
        w = torch.gather(attention, 1, fused)
        w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        parts.append((w.unsqueeze(-1) * _gather(patches, fused)).sum(1, keepdim=True))
        part_sizes.append(torch.gather(sizes, 1, fused).sum(1, keepdim=True))
    return torch.cat(parts, 1), torch.cat(part_sizes, 1), kept


# ------------------------------------------------------------------------------ the reservoir
@dataclass
class ReservoirEntry:
    entropy: float
    tokens: Tensor  # [L, width]: the class token after each block


@dataclass
class TokenReservoir:
    """The domain-aware token reservoir: per predicted class, at most ``size`` entries."""

    num_classes: int
    size: int = 3
    diversity_weight: float = 1.0
    entries: list[list[ReservoirEntry]] = field(default_factory=list)

    def __post_init__(self):
        if not self.entries:
            self.entries = [[] for _ in range(self.num_classes)]

    def __len__(self) -> int:
        return sum(len(e) for e in self.entries)

    def add(self, label: int, entropy: float, tokens: Tensor) -> None:
        """Insert an entry; if the class overflows, evict the one with the largest
        ``entropy + diversity_weight * mean cosine similarity to the class's other entries``."""
        bucket = self.entries[label]
        bucket.append(ReservoirEntry(float(entropy), tokens.detach().float()))
        if len(bucket) <= self.size:
            return
        ent = torch.tensor([e.entropy for e in bucket])
        if self.diversity_weight:
            z = F.normalize(torch.stack([e.tokens.mean(0) for e in bucket]), dim=-1)
            sim = z @ z.t()
            ent = ent + self.diversity_weight * (sim.sum(1) - sim.diagonal()) / (len(bucket) - 1)
        bucket.pop(int(ent.argmax()))

    def anchors(self, min_samples: int) -> Tensor | None:
        """Per-class mean class-token trajectories [C, L, width], or None until every class holds
        ``min_samples`` entries."""
        if any(len(b) < min_samples for b in self.entries):
            return None
        return torch.stack([torch.stack([e.tokens for e in b]).mean(0) for b in self.entries])

    def keys(self) -> tuple[Tensor, Tensor] | None:
        """Every entry's tokens [M, L, width] and class [M], or None when empty."""
        if not len(self):
            return None
        toks = [e.tokens for b in self.entries for e in b]
        labels = [c for c, b in enumerate(self.entries) for _ in b]
        return torch.stack(toks), torch.tensor(labels, dtype=torch.long)


def reservoir_logits(cls_tokens: Tensor, reservoir: TokenReservoir, cfg: TCAConfig) -> Tensor | None:
    """``lambda * exp(-beta (1 - affinity)) Y``: affinity = layer-weighted cosine similarity of
    the images' class tokens [B, L, w] to each reservoir entry's; None when the reservoir is empty."""
    keys = reservoir.keys()
    if keys is None:
        return None
    toks, labels = keys
    depth = cls_tokens.shape[1]
    w = torch.softmax(torch.linspace(0, 1, depth) / cfg.layer_temperature, 0)  # ∝ exp(t / T), t = 0..1
    cos = torch.einsum("bld,mld->bml", F.normalize(cls_tokens.float(), dim=-1), F.normalize(toks, dim=-1))
    affinity = cos @ w  # [B, M]
    onehot = F.one_hot(labels, reservoir.num_classes).float()
    return cfg.correction_weight * torch.exp(-cfg.beta * (1 - affinity)) @ onehot


# ------------------------------------------------------------------------------ the method
@dataclass
class TCAOutput:
    """One batch: ``logits`` (corrected), ``base_logits`` (the condensed model's zero-shot logits),
    ``features`` (normalized), ``cls_tokens`` [B, L, w], ``kept`` (per condensation block, the
    indices of the tokens kept as they are, into that block's input patch tokens) and
    ``anchored`` (whether anchors guided this batch)."""

    logits: Tensor
    base_logits: Tensor
    features: Tensor
    cls_tokens: Tensor
    kept: dict[int, Tensor]
    anchored: bool


class TCA:
    """Token condensation as adaptation on a frozen CLIP image tower.

    ``classifier`` [C, d]: normalized class text embeddings; ``scale``: the logit scale (default:
    the model's). Call :meth:`step` on each batch of preprocessed images of the test stream, in
    order; the reservoir persists across calls (:meth:`reset` empties it)."""

    def __init__(self, model, classifier: Tensor, cfg: TCAConfig | None = None, scale: float | None = None):
        self.visual: VisionTransformer = getattr(model, "visual", model)
        if not isinstance(self.visual, VisionTransformer):
            raise TypeError(f"TCA runs clipforge's VisionTransformer blocks, not a {type(self.visual).__name__}")
        if self.visual.class_embedding is None:
            raise ValueError("TCA needs a class token (its attention ranks the tokens); this tower has none")
        self.cfg = cfg or TCAConfig()
        self.classifier = classifier.float()  # used as given (normalized rows), so zero-shot logits match exactly
        self.scale = float(model.scale().detach()) if scale is None else float(scale)
        self.depth = len(self.visual.transformer.blocks)
        self.layers = set(self.cfg.condensation_layers(self.depth))
        self.reservoir = TokenReservoir(self.classifier.shape[0], self.cfg.reservoir_size, self.cfg.diversity_weight)

    def reset(self) -> None:
        self.reservoir = TokenReservoir(self.classifier.shape[0], self.cfg.reservoir_size, self.cfg.diversity_weight)

    def flops(self) -> dict[str, float]:
        """:func:`tca_flops` for this tower and config (anchored once anchors are in use)."""
        return tca_flops(self.visual.cfg, self.cfg, anchored=self.cfg.anchors)

    def _embed(self, pixels: Tensor) -> Tensor:
        """The tower's input sequence, as :meth:`VisionTransformer.forward_tokens` builds it."""
        v = self.visual
        if (
            pixels.ndim != 4
            or pixels.shape[1] != 3
            or pixels.shape[-1] != v.cfg.image_size
            or pixels.shape[-2] != v.cfg.image_size
        ):
            raise ValueError(
                f"expected images [B, 3, {v.cfg.image_size}, {v.cfg.image_size}], got {tuple(pixels.shape)}"
            )
        x = v.embed_patches(pixels)  # the tower's own patch embedding, so keep ratio 1 reproduces it exactly
        x = torch.cat([v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        return v.ln_pre(x + v.positional_embedding.to(x.dtype))

    @torch.no_grad()
    def encode(self, pixels: Tensor, anchors: Tensor | None = None) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """The condensed forward: normalized image features [B, d], the class token after each
        block [B, L, w] and the kept indices per condensation block. ``anchors`` [C, L, w]: the
        reservoir's per-class mean class tokens (None: unanchored)."""
        v = self.visual
        x = self._embed(pixels)
        b = x.shape[0]
        sizes = torch.ones(b, x.shape[1] - 1, dtype=x.dtype, device=x.device)
        cls_tokens, kept = [], {}
        condensed = False
        for i, block in enumerate(v.transformer.blocks):
            plan = plan_condensation(x.shape[1] - 1, self.cfg) if i in self.layers else None
            if plan is None or plan.out >= plan.n:
                x = block(x)
            else:
                seq, a = x, 0
                if anchors is not None and i > 0:
                    prev = anchors[:, i - 1].to(x.dtype)  # [C, w]: class tokens entering block i
                    pick = (F.normalize(x[:, 0], dim=-1) @ F.normalize(prev, dim=-1).t()).argmax(-1)
                    seq, a = torch.cat([prev[pick].unsqueeze(1), x], 1), 1
                out, cls_attn = class_token_attention(block, seq, cls_index=a)
                x = x + out[:, a:]
                cls_attn = cls_attn[:, :, a + 1 :]  # the real class token's attention to the patches
                x, sizes, kept[i] = condense(x, token_scores(cls_attn, self.cfg.score), cls_attn.mean(1), sizes, plan,
                                             self.cfg.mode)
                x = x + block.mlp(block.ln_2(x))
                condensed = True
            cls_tokens.append(x[:, 0])
        tokens = v.ln_post(x)
        if condensed and v.cfg.pool == "mean":  # the size-weighted mean: merged tokens count for their patches
            pooled = (tokens[:, v.num_prefix :] * sizes.unsqueeze(-1)).sum(1) / sizes.sum(1, keepdim=True)
        else:
            pooled = v.pool(tokens)
        feats = v.project(pooled)
        return F.normalize(feats, dim=-1), torch.stack(cls_tokens, 1), kept

    @torch.no_grad()
    def step(self, pixels: Tensor) -> TCAOutput:
        """Classify one batch of the stream, then add its images to the reservoir."""
        anchors = self.reservoir.anchors(self.cfg.anchor_min_samples) if self.cfg.anchors else None
        feats, cls_tokens, kept = self.encode(pixels, anchors)
        base = self.scale * feats @ self.classifier.to(feats.dtype).t()
        logits = base
        if self.cfg.correction_weight > 0:
            corr = reservoir_logits(cls_tokens, self.reservoir, self.cfg)
            if corr is not None:
                logits = base + corr.to(base.dtype)
        entropy = -(base.float().softmax(-1) * base.float().log_softmax(-1)).sum(-1)
        for j, label in enumerate(base.argmax(-1).tolist()):
            self.reservoir.add(label, float(entropy[j]), cls_tokens[j])
        return TCAOutput(logits, base, feats, cls_tokens, kept, anchors is not None)


def _pixels(chunk: list, image_size: int) -> Tensor:
    """Preprocess images as :func:`clipforge.evaluation.features.encode_images` does."""
    from ..transforms import image_transform, normalize_batch

    if all(isinstance(im, Tensor) and im.dtype == torch.uint8 for im in chunk):
        return normalize_batch(torch.stack(list(chunk)))
    transform = image_transform(image_size, is_train=False)
    return torch.stack([transform(im) for im in chunk])


def run_stream(model, classifier: Tensor, images: Sequence[Tensor] | Tensor, cfg: TCAConfig | None = None,
               batch_size: int = 1, order: Tensor | None = None, scale: float | None = None) -> dict:
    """Run TCA over a stream of images (uint8 [3, H, W] tensors at the model's size, anything the
    evaluation transform reads, or one preprocessed float batch [N, 3, H, W]) in ``order`` (default: as
    given), ``batch_size`` at a time. Returns ``logits`` and ``base_logits`` [N, C] in the original image
    order, ``seconds`` (forward time, the reservoir included) and ``images_per_second``."""
    tca = TCA(model, classifier, cfg, scale)
    n = len(images)
    order = torch.arange(n) if order is None else order
    logits = torch.empty(n, classifier.shape[0])
    base = torch.empty(n, classifier.shape[0])
    seconds = 0.0
    model.eval()
    for s in range(0, n, batch_size):
        idx = order[s : s + batch_size]
        if isinstance(images, Tensor) and images.dtype != torch.uint8:
            pixels = images[idx]
        else:
            pixels = _pixels([images[int(i)] for i in idx], model.image_size)
        t = time.perf_counter()
        out = tca.step(pixels)
        seconds += time.perf_counter() - t
        logits[idx], base[idx] = out.logits.float(), out.base_logits.float()
    return {"logits": logits, "base_logits": base, "seconds": seconds, "images_per_second": n / max(seconds, 1e-9),
            "reservoir": len(tca.reservoir), "flops": tca.flops()}
