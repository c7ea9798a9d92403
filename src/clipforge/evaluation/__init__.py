"""clipforge.evaluation: zero-shot classification, retrieval and the dataset task lists.

Depends on the library core; the core never imports it.
"""
from .features import encode_images, encode_texts
from .retrieval import retrieval_metrics
from .shapes_eval import evaluate_shapes
from .zero_shot import classification_metrics, zero_shot_classifier, zero_shot_eval

__all__ = ["encode_images", "encode_texts", "retrieval_metrics", "evaluate_shapes", "classification_metrics",
           "zero_shot_classifier", "zero_shot_eval"]
