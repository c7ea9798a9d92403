"""CLIP-MoE's sparse mixture-of-experts towers (Zhang et al., 2024, "CLIP-MoE: Towards Building Mixture
of Experts for CLIP with Diversified Multiplet Upcycling").

Every FFN of the chosen transformer blocks becomes a top-k mixture of E expert FFNs with a linear router
(no bias), as in the paper and its official code. For the tokens x_t [T, C] of one block:

    p_t = softmax(W_r x_t)                               router probabilities over the E experts
    S_t = the k experts with the largest p_t             (top-k dispatch)
    g_t,e = p_t,e / sum_{e' in S_t} p_t,e'   (e in S_t)  gates renormalized over the chosen experts
    y_t = sum_{e in S_t} g_t,e FFN_e(x_t)                each expert runs only on the tokens routed to it

and the block keeps its residual form x + y. Because the gates sum to 1, an MoE whose experts are copies
of one dense FFN computes exactly that FFN (:func:`upcycle`; tests/models/test_moe.py::
test_identical_experts_equal_the_dense_model).

The load-balancing auxiliary loss is the Switch-Transformer form the official code uses, over the router
logits of all MoE layers of a tower concatenated (T tokens in all):

    L_balance = E * sum_e f_e * P_e,   f_e = (1/T) sum_t 1[e in S_t],   P_e = (1/T) sum_t p_t,e

(:func:`balance_loss`); the model's forward sums it over the two towers and returns it as
``moe_balance_loss``, which the ``moe_balance`` loss term hands to training
(``loss={clip: 1.0, moe_balance: 0.01}``). The router logits of the last forward pass are kept on
each :class:`MoEFFN` (``last_logits``) so that the transformer blocks stay unchanged.

:class:`MoECLIPConfig` is a :class:`~clipforge.models.config.CLIPConfig` with a ``moe`` section
(``experts``, ``top_k``, ``towers``, ``layers``: the last N blocks of each tower, all by default, as the
official ``--moe-layers``); it builds :class:`MoECLIP`. The diversified multiplet stage that makes the
experts differ is a training program (:mod:`clipforge.train.upcycle`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clip import CLIP
from .config import CLIPConfig
from .text import TextTransformer
from .vision import VisionTransformer

TOWERS = ("vision", "text")


@dataclass
class MoEConfig:
    experts: int = 4
    top_k: int = 2
    towers: tuple[str, ...] = TOWERS
    layers: int | None = None  # MoE in the last N blocks of each tower; None: every block

    def __post_init__(self):
        self.towers = tuple(self.towers)
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"moe needs 1 <= top_k <= experts, got top_k={self.top_k}, experts={self.experts}")
        if not self.towers or set(self.towers) - set(TOWERS):
            raise ValueError(f"moe.towers must name some of {list(TOWERS)}, got {list(self.towers)}")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"moe.layers must be >= 1 (or null for every block), got {self.layers}")


@dataclass
class MoECLIPConfig(CLIPConfig):
    moe: MoEConfig = field(default_factory=MoEConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoECLIPConfig:
        return cls.variant_from_dict(d, {"moe": MoEConfig})


def route(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(probabilities [T, E], chosen experts [T, k], renormalized gates [T, k]) of router logits [T, E]."""
    probs = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))  # fp32 at least (bf16)
    top, chosen = probs.topk(top_k, dim=-1)
    return probs, chosen, top / top.sum(dim=-1, keepdim=True)


def balance_loss(logits: Tensor, top_k: int) -> Tensor:
    """E * sum_e f_e P_e over router logits [T, E] (module docstring)."""
    probs, chosen, _ = route(logits, top_k)
    dispatched = F.one_hot(chosen, probs.shape[-1]).sum(dim=1).to(probs.dtype)  # [T, E]: 1 where e is among the top k
    return probs.shape[-1] * (dispatched.mean(0) * probs.mean(0)).sum()


class MoEFFN(nn.Module):
    """A top-k mixture of expert FFNs with a linear router: ``forward(x [..., C]) -> [..., C]``."""

    def __init__(self, width: int, experts: list[nn.Module], top_k: int):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.router = nn.Linear(width, len(experts), bias=False)
        self.top_k = top_k
        self.last_logits: Tensor | None = None

    def __getstate__(self):
        # copies (copy.deepcopy: an EMA teacher, reparameterizing) and pickles leave out the last pass's logits,
        # which may be part of an autograd graph
        return {**self.__dict__, "last_logits": None}

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = self.router(tokens)
        self.last_logits = logits
        _, chosen, gates = route(logits, self.top_k)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if rows.numel():
                out.index_add_(0, rows, (expert(tokens[rows]) * gates[rows, slot, None].to(tokens.dtype)).to(out.dtype))
        return out.view(shape)


def _tower_blocks(model: CLIP, tower: str):
    module = model.visual if tower == "vision" else model.text
    kind = VisionTransformer if tower == "vision" else TextTransformer
    if not isinstance(module, kind):
        raise ValueError(f"CLIP-MoE upcycles the FFN layers of transformer blocks; this model's {tower} tower is a "
                         f"{type(module).__name__} without such FFN layers. Upcycle a ViT/transformer CLIP (e.g. one "
                         f"trained with model=tiny) or leave '{tower}' out of moe.towers")
    return module.transformer.blocks


def moe_layers(model: CLIP, cfg: MoEConfig) -> dict[str, list[int]]:
    """The block indices per tower that carry an MoE (the last ``cfg.layers`` of each)."""
    out = {}
    for tower in cfg.towers:
        n = len(_tower_blocks(model, tower))
        if n == 0:
            raise ValueError(f"the {tower} tower has no transformer blocks, so no FFN layers to upcycle")
        k = n if cfg.layers is None else cfg.layers
        if k > n:
            raise ValueError(f"moe.layers={k} exceeds the {n} blocks of the {tower} tower; lower it")
        out[tower] = list(range(n - k, n))
    return out


class MoECLIP(CLIP):
    """CLIP whose chosen transformer FFNs are :class:`MoEFFN` (module docstring)."""

    extra_outputs = ("moe_balance_loss",)

    def __init__(self, cfg: MoECLIPConfig):
        super().__init__(cfg)
        self.moe_blocks = moe_layers(self, cfg.moe)
        if "text" in self.moe_blocks and isinstance(self.text, TextTransformer):
            self.text.trim_padding = False  # the balance loss reads the routing of every position, padding included
        for tower, indices in self.moe_blocks.items():
            blocks = _tower_blocks(self, tower)
            for i in indices:
                dense = blocks[i].mlp
                experts = [_copy_ffn(dense, reinit=True) for _ in range(cfg.moe.experts)]
                blocks[i].mlp = MoEFFN(dense[0].in_features, experts, cfg.moe.top_k)

    def moe_ffns(self, tower: str) -> list[MoEFFN]:
        blocks = _tower_blocks(self, tower)
        return [blocks[i].mlp for i in self.moe_blocks.get(tower, [])]

    def balance_loss(self) -> Tensor:
        """L_balance of the last forward pass, per tower over its MoE layers' logits, summed over the towers."""
        total = None
        for tower in self.moe_blocks:
            logits = [f.last_logits for f in self.moe_ffns(tower) if f.last_logits is not None]
            if logits:
                value = balance_loss(torch.cat(logits), self.cfg.moe.top_k)
                total = value if total is None else total + value
        return total if total is not None else self.logit_scale.new_zeros(())

    def forward(self, images: Tensor | None = None, texts: Tensor | None = None, return_tokens: bool = False):
        for tower in self.moe_blocks:
            for f in self.moe_ffns(tower):
                f.last_logits = None
        out = super().forward(images, texts, return_tokens=return_tokens)
        out["moe_balance_loss"] = self.balance_loss()
        return out


def _copy_ffn(dense: nn.Sequential, reinit: bool = False) -> nn.Sequential:
    import copy

    ffn = copy.deepcopy(dense)
    if reinit:
        for m in ffn:
            if isinstance(m, nn.Linear):
                m.reset_parameters()
    return ffn


def upcycle(model: CLIP, experts: int = 4, top_k: int = 2, towers: tuple[str, ...] = TOWERS,
            layers: int | None = None, donors: list[CLIP] | None = None) -> MoECLIP:
    """An :class:`MoECLIP` from the dense ``model``: every weight outside the FFNs is copied; expert e of each
    upcycled FFN is the FFN of ``donors[e]`` (models of ``model``'s architecture that differ in their FFNs,
    the multiplet), or a copy of ``model``'s own FFN when ``donors`` is None (then the MoE equals the dense
    model). Routers start from PyTorch's default Linear initialization, as in the official code."""
    moe = MoEConfig(experts, top_k, tuple(towers), layers)
    moe_layers(model, moe)  # a tower without transformer FFNs: a clear error before anything is built
    if type(model) is not CLIP:
        raise ValueError(f"upcycling takes a dense clipforge CLIP model, got a {type(model).__name__}; CoCa and "
                         "already upcycled models are not supported")
    if donors is not None and len(donors) != experts:
        raise ValueError(f"{len(donors)} donor models for {experts} experts: give one per expert")
    cfg = MoECLIPConfig(**{f.name: getattr(model.cfg, f.name) for f in dataclasses.fields(CLIPConfig)}, moe=moe)
    out = MoECLIP(cfg).to(next(model.parameters()).dtype)
    state = {k: v for k, v in model.state_dict().items()}
    own = out.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(value)
        for tower, indices in out.moe_blocks.items():
            for i in indices:
                ffn = _tower_blocks(out, tower)[i].mlp
                for e, expert in enumerate(ffn.experts):
                    source = _tower_blocks(donors[e] if donors is not None else model, tower)[i].mlp
                    expert.load_state_dict(source.state_dict())
    return out.train(model.training)
