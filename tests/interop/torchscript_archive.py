"""A TorchScript archive that holds a state dict under its dotted names, as OpenAI's JIT checkpoints do; shared
by the OpenAI-loading parity tests and the untrusted-checkpoint tests (which add a payload module)."""
from __future__ import annotations

import torch
from torch import nn


class Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def scripted_state(sd: dict, payload: nn.Module | None = None):
    """``sd`` as a scripted module tree (parameters at the same dotted names), plus ``payload`` if given."""
    root = Holder()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, Holder())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    if payload is not None:
        root.add_module("payload", payload)
    return torch.jit.script(root)
