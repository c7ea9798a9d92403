"""Long-CLIP's knowledge-preserved stretching of the text positional embedding (Zhang et al.,
2024, "Long-CLIP: Unlocking the Long-Text Capability of CLIP", Sec. 3.1).

CLIP's text tower learns its positional embedding over 77 positions, but the paper finds that
only about the first 20 are well trained. Long-CLIP keeps those ``keep`` rows as they are and
stretches the remaining ``n = L - keep`` rows by linear interpolation with ratio ``factor``
(4 in the paper: 77 -> 20 + 57 * 4 = 248 positions). For a row ``i`` of the tail
(0 <= i < n) and ``j = 0 .. factor-1``:

    PE'[keep + factor*i + j] = PE[keep + i] + (j / factor) * (PE[keep + i + 1] - PE[keep + i])   (i < n - 1)
    PE'[keep + factor*(n-1) + j] = PE[L-1] + (j / factor) * (PE[L-1] - PE[L-2])                  (last row:
                                                                                               extrapolated)

exactly as the authors' code does (the last original row is extended with its own slope).
Every original row reappears at ``keep + factor*i``.

``stretch_context(model)`` returns a copy of a clipforge CLIP with the stretched embedding and
``text.context_length = keep + factor * (L - keep)``; with ``keep >= 1`` the first ``keep`` positions
are unchanged, so a causal text tower encodes any text of at most ``keep`` tokens (start and end
token included) exactly as before. Long-CLIP then fine-tunes with long captions and the
primary-component matching loss (:mod:`clipforge.losses.long_clip`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class LongContextConfig:
    """Knowledge-preserved stretching: keep the first ``keep`` positions, interpolate the rest ``factor``x."""

    keep: int = 20
    factor: int = 4

    def __post_init__(self):
        if self.keep < 0:
            raise ValueError(f"long_context keep must be >= 0, got {self.keep}")
        if self.factor < 1:
            raise ValueError(f"long_context factor must be an integer >= 1, got {self.factor}")

    def stretched_length(self, context_length: int) -> int:
        if context_length - self.keep < 2:
            raise ValueError(f"stretching needs at least 2 positions after the kept {self.keep}; the context has "
                             f"{context_length}")
        return self.keep + self.factor * (context_length - self.keep)


def stretch_positional_embedding(pos: Tensor, keep: int = 20, factor: int = 4) -> Tensor:
    """[L, d] -> [keep + factor * (L - keep), d]: rows < keep copied, the rest interpolated (module docstring)."""
    if pos.ndim != 2:
        raise ValueError(f"expected a positional embedding of shape [L, d], got {tuple(pos.shape)}")
    LongContextConfig(keep, factor).stretched_length(pos.shape[0])
    rest = pos[keep:]  # [n, d]
    slope = torch.cat([rest[1:] - rest[:-1], rest[-1:] - rest[-2:-1]])  # [n, d]; the last row keeps its slope
    frac = torch.arange(factor, dtype=pos.dtype, device=pos.device) / factor  # [factor]
    tail = rest[:, None, :] + frac[None, :, None] * slope[:, None, :]  # [n, factor, d]
    return torch.cat([pos[:keep], tail.reshape(-1, pos.shape[1])])


def stretch_context(model: nn.Module, keep: int = 20, factor: int = 4) -> nn.Module:
    """A copy of ``model`` (a clipforge CLIP with its own text transformer) whose text tower
    takes ``keep + factor * (L - keep)`` tokens (248 for CLIP's 77 with the defaults)."""
    if getattr(model.cfg, "hf_text", None) is not None:
        raise ValueError("stretch_context stretches clipforge's text transformer; this model has a Hugging Face "
                         "text tower")
    cfg = LongContextConfig(keep, factor)
    old = model.text.positional_embedding
    new_len = cfg.stretched_length(old.shape[0])
    out = copy.deepcopy(model)
    with torch.no_grad():
        stretched = stretch_positional_embedding(old.detach(), keep, factor)
    out.text.positional_embedding = nn.Parameter(stretched, requires_grad=old.requires_grad)
    out.cfg = copy.deepcopy(model.cfg)
    out.cfg.text.context_length = new_len
    out.text.cfg = out.cfg.text
    return out
