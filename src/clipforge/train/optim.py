"""AdamW with the usual CLIP parameter groups and a warmup + cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, eps: float) -> torch.optim.AdamW:
    """No weight decay on norms, biases, embeddings and the logit scale/bias (as in CLIP/OpenCLIP)."""
    skip = model.no_weight_decay_names() if hasattr(model, "no_weight_decay_names") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip or p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel updates all tensors in one pass (CPU and CUDA), noticeably faster for many small tensors
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup from ~0 to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, warmup: int, total: int, min_ratio: float = 0.0, last_epoch: int = -1):
    """The warmup + cosine schedule; ``last_epoch`` = the number of steps already taken continues a resumed run
    from there (its groups' ``initial_lr`` is the peak lr), with the lr of step ``last_epoch`` set at once."""
    if last_epoch == 0:  # nothing taken yet: a fresh schedule from the groups' peak lr
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
    last_epoch = max(last_epoch - 1, -1)  # LambdaLR steps once on construction
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, warmup, total, min_ratio),
                                             last_epoch=last_epoch)
