"""Which parameters train: ``freeze`` and ``trainable`` patterns on parameter names (fnmatch).

- LiT (Zhai et al., 2022): a locked pretrained tower, the other trained: ``freeze=["text.*"]``
  (a Hugging Face text tower can also be locked in its config, ``hf_text.lock``).
- uCLIP / projection-only alignment of two frozen pretrained towers:
  ``trainable=["visual.proj", "text.proj", "logit_scale"]``.

``trainable`` (when given) keeps only the matching parameters trainable; ``freeze`` then
freezes the matching ones among those. A pattern that matches no parameter is an error that
lists the top-level names, so a typo cannot silently train everything.
"""
from __future__ import annotations

from fnmatch import fnmatch
from typing import Sequence

from torch import nn


def apply_freeze(model: nn.Module, freeze: Sequence[str] = (), trainable: Sequence[str] = ()) -> tuple[int, int]:
    """Set ``requires_grad``; returns (trainable, total) parameter counts."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in (*freeze, *trainable):
        if not any(fnmatch(n, pattern) for n in names):
            prefixes = sorted({n.split(".")[0] + (".*" if "." in n else "") for n in names})
            raise ValueError(f"freeze/trainable pattern '{pattern}' matches no parameter; names look like "
                             f"{prefixes} (e.g. visual.proj, text.transformer.blocks.0.*)")
    for name, p in model.named_parameters():
        if trainable and not any(fnmatch(name, pat) for pat in trainable):
            p.requires_grad_(False)
        if any(fnmatch(name, pat) for pat in freeze):
            p.requires_grad_(False)
    params = list(model.parameters())
    n_train = sum(p.numel() for p in params if p.requires_grad)
    if n_train == 0:
        raise ValueError("freeze/trainable leave no parameter to train")
    return n_train, sum(p.numel() for p in params)
