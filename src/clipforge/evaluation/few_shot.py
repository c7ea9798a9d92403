"""Training-free few-shot adaptation on frozen CLIP features, as the evaluation suite runs it.

The methods live in :mod:`clipforge.adapt` (one module per method); this module names the
ones the suite's ``few_shot`` task uses and the ensembling rule:

- :func:`gda_logits`: Gaussian discriminant analysis (Wang et al., ICLR 2024), :mod:`clipforge.adapt.gda`;
- :func:`tip_adapter_logits`: the key-value cache of Tip-Adapter (Zhang et al., ECCV 2022),
  :mod:`clipforge.adapt.tip_adapter`;
- :func:`caps_adapter_logits`: CapS-Adapter (Wang et al., 2024), the Tip-Adapter cache with
  caption embeddings as keys, and :func:`caption_support`, its support set (the same code
  ``clipforge adapt --method caps`` runs);
- :func:`ensemble`: zero-shot logits + alpha * adapter logits.
"""
from __future__ import annotations

from torch import Tensor

from ..adapt.gda import gda_classifier, gda_logits
from ..adapt.tip_adapter import caps_adapter_logits, caption_support, tip_adapter_logits

__all__ = ["gda_classifier", "gda_logits", "tip_adapter_logits", "caps_adapter_logits", "caption_support", "ensemble"]


def ensemble(zero_shot_logits: Tensor, adapter_logits: Tensor, alpha: float) -> Tensor:
    return zero_shot_logits + alpha * adapter_logits
