"""Renaming weights between clipforge and another layout, in both directions.

A layout is a list of :class:`Rule` s. Each rule says how one clipforge tensor is built from
one or more foreign tensors: copied, transposed, concatenated (separate q, k, v projections
into one fused ``in_proj``) or reshaped (a [1] scalar into a 0-d one). The same rules run
backwards for export. Every foreign tensor must be used exactly once: leftovers are reported
as unexpected keys, absent ones as missing keys, and a wrong shape names the tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Kind = Literal["copy", "transpose", "cat", "scalar"]


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: tuple[str, ...]
    kind: Kind = "copy"


def rule(ours: str, theirs: str | tuple[str, ...], kind: Kind = "copy") -> Rule:
    return Rule(ours, (theirs,) if isinstance(theirs, str) else tuple(theirs), kind)


def block_rules(
    ours_prefix: str, theirs_prefix: str, layers: int, names: dict[str, str | tuple[str, ...]]
) -> list[Rule]:
    """Rules for ``layers`` transformer blocks; ``names`` maps our block-local names to theirs."""
    out = []
    for i in range(layers):
        for ours, theirs in names.items():
            kind: Kind = "cat" if isinstance(theirs, tuple) else "copy"
            t = (
                tuple(f"{theirs_prefix}{i}.{n}" for n in theirs)
                if isinstance(theirs, tuple)
                else f"{theirs_prefix}{i}.{theirs}"
            )
            out.append(rule(f"{ours_prefix}{i}.{ours}", t, kind))
    return out


def _convert(rule_: Rule, tensors: list[Tensor]) -> Tensor:
    if rule_.kind == "copy":
        return tensors[0]
    if rule_.kind == "transpose":
        return tensors[0].t().contiguous()
    if rule_.kind == "scalar":
        return tensors[0].reshape(())
    return torch.cat(tensors, dim=0)


def import_state(
    rules: list[Rule], theirs: dict[str, Tensor], source: str, ignore: tuple[str, ...] = ()
) -> dict[str, Tensor]:
    """Build our state dict from a foreign one; missing and unexpected keys are named."""
    used = {k for r in rules for k in r.theirs}
    missing = sorted(k for k in used if k not in theirs)
    unexpected = sorted(k for k in theirs if k not in used and not any(k == i or k.endswith(i) for i in ignore))
    if missing or unexpected:
        raise KeyError(
            f"{source}: the weights do not match the inferred architecture: missing keys {_short(missing)}, "
            f"unexpected keys {_short(unexpected)}. The checkpoint has parts clipforge cannot represent, or is "
            "damaged; check that the file is a complete checkpoint of the format it was loaded as."
        )
    return {r.ours: _convert(r, [theirs[k] for k in r.theirs]) for r in rules}


def export_state(
    rules: list[Rule], ours: dict[str, Tensor], theirs_shapes: dict[str, tuple] | None = None
) -> dict[str, Tensor]:
    """The inverse of :func:`import_state`: split fused tensors, transpose back, restore shapes."""
    out = {}
    for r in rules:
        t = ours[r.ours].detach()
        if r.kind == "cat":
            for name, part in zip(r.theirs, t.chunk(len(r.theirs), dim=0)):
                out[name] = part.contiguous()
        elif r.kind == "transpose":
            out[r.theirs[0]] = t.t().contiguous()
        elif r.kind == "scalar":
            shape = (theirs_shapes or {}).get(r.theirs[0], ())
            out[r.theirs[0]] = t.reshape(shape).contiguous()
        else:
            out[r.theirs[0]] = t.contiguous()
    return out


def load_into(model: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load a converted state dict, naming missing/unexpected keys and the first shape mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"{source}: missing keys {_short(missing)}, unexpected keys {_short(unexpected)}")
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{source}: shape mismatch for tensor '{k}': checkpoint {tuple(v.shape)} vs model "
                f"{tuple(own[k].shape)} "
                "(the config does not describe these weights)"
            )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _short(keys: list[str], n: int = 8) -> str:
    return "[]" if not keys else str(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def count_layers(keys, prefix: str) -> int:
    """Number of blocks ``prefix{i}.`` present among ``keys``."""
    idx = {
        int(k[len(prefix) :].split(".", 1)[0])
        for k in keys
        if k.startswith(prefix) and k[len(prefix) :].split(".", 1)[0].isdigit()
    }
    return max(idx) + 1 if idx else 0
