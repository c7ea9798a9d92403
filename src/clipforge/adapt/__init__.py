"""clipforge.adapt: adapt a trained CLIP to a task with little or no training.

One method per module, each on frozen CLIP features or a frozen model:

- :mod:`.tip_adapter`: Tip-Adapter (training-free cache model), Tip-Adapter-F (trainable
  cache keys) and CapS-Adapter (caption keys);
- :mod:`.coop`: CoOp prompt learning (learnable context vectors in the text tower);
- :mod:`.tmm`: TMM, class-aware image-conditioned prompts and text-guided feature tuning on CoOp;
- :mod:`.gopro`: GOPro, image-generated prompts and projectors with view and prompt-consistency losses;
- :mod:`.gda`: Gaussian discriminant analysis (training-free);
- :mod:`.clipn`: CLIPN-style learned "no" prompts for out-of-distribution detection;
- :mod:`.tca`: TCA, token condensation as training-free test-time adaptation (no support set:
  the test stream itself, through a condensed image tower);
The experiment that fits and compares them on a dataset's few-shot split (``clipforge adapt``)
is :mod:`clipforge.evaluation.adaptation`: it needs the evaluation suite's data and cache, and
evaluation sits above adapt (``tests/test_architecture.py``). Below adapt: the core and
:mod:`clipforge.metrics`; adapt never imports evaluation.
"""
from .common import FeatureSet
from .coop import CoOpConfig, PromptLearner, fit_coop
from .gda import gda_classifier, gda_logits
from .gopro import GOProConfig, GOProLearner, encode_views, fit_gopro
from .tca import TCA, TCAConfig, TokenReservoir, tca_flops
from .tip_adapter import (
                          TipAdapterF,
                          TipAdapterFConfig,
                          TipSearch,
                          caps_adapter_logits,
                          caption_support,
                          fit_caps_adapter,
                          fit_tip_adapter,
                          fit_tip_adapter_f,
                          search_alpha_beta,
                          tip_adapter_logits,
)
from .tmm import TMMConfig, TMMLearner, fit_tmm

__all__ = [
    "FeatureSet",
    "CoOpConfig",
    "PromptLearner",
    "fit_coop",
    "gda_classifier",
    "gda_logits",
    "TCA",
    "TCAConfig",
    "TokenReservoir",
    "tca_flops",
    "TipAdapterF",
    "TipAdapterFConfig",
    "TipSearch",
    "caps_adapter_logits",
    "fit_tip_adapter",
    "fit_tip_adapter_f",
    "search_alpha_beta",
    "tip_adapter_logits",
    "caption_support",
    "fit_caps_adapter",
    "TMMConfig",
    "TMMLearner",
    "fit_tmm",
    "GOProConfig",
    "GOProLearner",
    "encode_views",
    "fit_gopro",
]
