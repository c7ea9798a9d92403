"""AdamW with the usual CLIP parameter groups and a warmup + cosine schedule.

``TouchedRowsAdamW`` is torch's AdamW that leaves out the rows of vocabulary tables no gradient has reached yet:
for those rows AdamW's own update is exactly zero, so the result is the same, and a from-scratch run on a corpus
that uses a few thousand of the tokenizer's 49,408 tokens stops paying for a dense update of the whole table
every step (measured: about half of the optimizer step of ``tiny`` on ``shapes`` captions, under 1.5% of the whole
step; docs/performance.md, "Token-embedding update").
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.adam import adam

# A table gets the row-wise update when it has at least this many rows (a tokenizer's vocabulary, not a
# handful of type or position embeddings, whose rows all train every step).
MIN_VOCABULARY_ROWS = 1024


class TouchedRowsAdamW(torch.optim.AdamW):
    """AdamW (Loshchilov & Hutter, 2019) whose step over the ``row_params`` tables updates only their touched rows.

    For a parameter in a group with weight decay 0, one AdamW step is ``m = b1 m + (1 - b1) g``,
    ``v = b2 v + (1 - b2) g^2``, ``p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)``. A row whose gradient,
    ``m`` and ``v`` are all zero therefore keeps ``p``, ``m`` and ``v`` exactly as they were. An embedding table's
    gradient is zero on every row whose token was not in the batch, and ``m`` and ``v`` stay zero on rows that
    never had a gradient, so updating only the rows that ever had one gives torch's dense result bit for bit
    (``tests/train/test_optim.py``). The rows are found from the gradient each step (``g != 0``; NaN counts as
    touched) and remembered; after ``load_state_dict`` they are found again from ``m`` and ``v``. The step
    gathers those rows, runs torch's own ``adam`` kernel (fused, foreach or loop, as the group says) on them and
    writes them back; once more than ``dense_fraction`` of a table's rows are touched, the table takes the dense
    step from then on (gathering would then cost more than it saves, and rows are never untouched again).

    This is not ``torch.optim.SparseAdam``, which skips the moment decay of rows missing from a batch and so
    changes the result. Tables in a group with weight decay, ``amsgrad``, ``maximize``, sharded (DTensor)
    parameters and steps driven by a gradient scaler (``grad_scale``/``found_inf``) take the dense step.
    The state dict is plain AdamW's: checkpoints load into either optimizer.
    """

    def __init__(self, params, *, row_params=(), dense_fraction: float = 0.5, **kwargs):
        if kwargs.get("differentiable"):
            raise ValueError("TouchedRowsAdamW does not support differentiable=True; use torch.optim.AdamW")
        super().__init__(params, **kwargs)
        if not 0.0 <= dense_fraction <= 1.0:
            raise ValueError(f"dense_fraction must be in [0, 1], got {dense_fraction}")
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        for p in row_params:
            if p.ndim != 2 or id(p) not in owned:
                raise ValueError(f"row_params must be 2-D tables among the optimizer's parameters, got shape "
                                 f"{tuple(p.shape)}" + ("" if id(p) in owned else " (not in any parameter group)"))
        self._row_params = {id(p) for p in row_params}
        self._touched: dict[int, torch.Tensor] = {}  # id(param) -> bool per row: had a gradient at some step
        self._dense: set[int] = set()  # tables past dense_fraction: rows never become untouched again
        self.dense_fraction = dense_fraction

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._touched.clear()  # found again from the restored moments
        self._dense.clear()

    def _row_wise(self, group: dict, p: torch.Tensor) -> bool:
        from torch.distributed.tensor import DTensor

        return (id(p) in self._row_params and id(p) not in self._dense and p.grad is not None and not p.grad.is_sparse
                and group["weight_decay"] == 0 and not group["amsgrad"] and not group["maximize"]
                and not group["differentiable"] and not isinstance(p, DTensor))

    @torch.no_grad()
    def step(self, closure=None):
        # Adam.step's body, not a call to it: torch wraps each optimizer class's step once for hooks, so calling the
        # parent's (wrapped) step from here would run every registered step hook twice per step.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scaled = getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None
        for group in self.param_groups:
            rows = [] if scaled else [p for p in group["params"] if self._row_wise(group, p)]
            held = {id(p) for p in rows}
            dense = [p for p in group["params"] if p.grad is not None and id(p) not in held]
            if dense:
                self._adam(group, dense)
            for p in rows:
                self._step_rows(group, p)
        return loss

    def _adam(self, group: dict, params: list, rows: torch.Tensor | None = None) -> None:
        """torch's AdamW step of ``params`` with ``group``'s settings; with ``rows`` (one table), of those rows only."""
        tensors: tuple[list, ...] = ([], [], [], [], [], [])  # params, grads, exp_avgs, exp_avg_sqs, max, steps
        has_complex = self._init_group({**group, "params": params}, *tensors)  # the state exactly as AdamW makes it
        params_, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = tensors
        if rows is not None:
            full = (params_[0], exp_avgs[0], exp_avg_sqs[0])
            params_, grads, exp_avgs, exp_avg_sqs = ([t[0].index_select(0, rows)]
                                                     for t in (params_, grads, exp_avgs, exp_avg_sqs))
        beta1, beta2 = group["betas"]
        adam(params_, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad=group["amsgrad"],
             has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
             eps=group["eps"], maximize=group["maximize"], foreach=group["foreach"], capturable=group["capturable"],
             differentiable=group["differentiable"], fused=group["fused"], grad_scale=getattr(self, "grad_scale", None),
             found_inf=getattr(self, "found_inf", None), decoupled_weight_decay=group["decoupled_weight_decay"])
        if rows is not None:
            for whole, updated in zip(full, (params_[0], exp_avgs[0], exp_avg_sqs[0])):
                whole.index_copy_(0, rows, updated)

    def _step_rows(self, group: dict, p: torch.Tensor) -> None:
        touched = self._touched.get(id(p))
        if touched is None:
            state = self.state[p]
            touched = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    touched |= _nonzero_rows(state[key])
            self._touched[id(p)] = touched
        touched |= _nonzero_rows(p.grad)
        rows = touched.nonzero().squeeze(1)
        if rows.numel() > self.dense_fraction * p.shape[0]:
            # for good (the group's dense step takes it from the next step): the scan would cost about as much
            # as the dense step it decides on, and rows never become untouched again
            self._dense.add(id(p))
            del self._touched[id(p)]
            rows = None
        self._adam(group, [p], rows)


def _nonzero_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows with a non-zero (or NaN) entry. Two row reductions read the table without writing a same-sized mask,
    several times faster than ``t.ne(0).any(1)``; NaN propagates through max and min and compares unequal to 0."""
    return t.amax(dim=1).ne(0) | t.amin(dim=1).ne(0)


def vocabulary_tables(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the model's ``nn.Embedding`` tables with at least ``MIN_VOCABULARY_ROWS`` rows."""
    return [m.weight for m in model.modules()
            if isinstance(m, nn.Embedding) and m.num_embeddings >= MIN_VOCABULARY_ROWS and m.weight.requires_grad]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, eps: float) -> torch.optim.AdamW:
    """No weight decay on norms, biases, embeddings and the logit scale/bias (as in CLIP/OpenCLIP); vocabulary
    tables update only the rows their tokens reached (``TouchedRowsAdamW``, the same result as dense AdamW)."""
    skip = model.no_weight_decay_names() if hasattr(model, "no_weight_decay_names") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip or p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel updates all tensors in one pass (CPU and CUDA), noticeably faster for many small tensors
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    undecayed = {id(p) for p in no_decay}
    tables = [p for p in vocabulary_tables(model) if id(p) in undecayed]
    return TouchedRowsAdamW(groups, row_params=tables, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


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
