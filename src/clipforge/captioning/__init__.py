"""clipforge.captioning: CLIP as a captioner (MacCap text-only training, CoCa decoding, SCST with a CLIP-S
reward) and caption metrics.

A program at the evaluation level: it reads the library core (models, data, tokenizer); the core never
imports it. See docs/captioning.md.
"""
from .attributes import attribute_accuracy
from .loading import load_captioner
from .maccap import (
                     MacCapCaptioner,
                     MacCapConfig,
                     MacCapDecoder,
                     is_maccap_dir,
                     noise_injection,
                     region_features,
                     train_maccap,
)
from .metrics import bleu, cider_d, clip_s, clip_scores_for_texts, is_repetitive, ref_clip_s, repetition_rate
from .scst import CoCaPolicy, MacCapPolicy, frozen_judge, scst_loss, scst_step

__all__ = ["CoCaPolicy", "MacCapCaptioner", "MacCapConfig", "MacCapDecoder", "MacCapPolicy", "attribute_accuracy",
           "bleu", "cider_d", "clip_s", "clip_scores_for_texts", "frozen_judge", "is_maccap_dir", "is_repetitive",
           "load_captioner", "noise_injection", "ref_clip_s", "region_features", "repetition_rate", "scst_loss",
           "scst_step", "train_maccap"]
