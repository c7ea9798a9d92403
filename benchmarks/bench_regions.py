"""Fidelity plug-ins for the region methods (benchmarks/fidelity/cloc.yaml, comclip.yaml).

- ``regions(model, eval_size)``: :func:`clipforge.evaluation.regions.evaluate_regions` on ``eval_size`` val
  scenes: the model's own region embeddings (the region head when it has one, else crop-and-encode) and, for
  every model, crop-and-encode, so a CLOC arm is compared with plain CLIP's crops and with its own crops.
- ``comclip_arm(seed, steps, batch, eval_size, method)``: the base model of ``seed`` (bench_adapt.base_model,
  shared with the adapter recipes) scored on ``eval_size`` scenes of shapes' relations split by plain CLIP
  (``clip``) or ComCLIP with the scene's boxes (``comclip``) or with the component detector (``comclip_detected``).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def regions(model, eval_size: int) -> dict:
    from clipforge.evaluation.regions import evaluate_regions
    from clipforge.tokenizer import get_tokenizer

    tok = get_tokenizer(model.context_length)
    own = evaluate_regions(model, tok, size=eval_size)
    crop = evaluate_regions(model, tok, size=eval_size, method="crop")
    return {"region_object_top1": own["object_top1"], "region_shape_top1": own["shape_top1"],
            "region_r2t_R@1": own["r2t_R@1"], "crop_object_top1": crop["object_top1"],
            "crop_r2t_R@1": crop["r2t_R@1"]}


regions.metrics = ("region_object_top1", "region_shape_top1", "region_r2t_R@1", "crop_object_top1", "crop_r2t_R@1")


def comclip_arm(seed: int, steps: int, batch: int, eval_size: int, method: str) -> dict:
    from bench_adapt import base_model

    from clipforge.adapt.comclip import ComCLIP, swap_accuracy
    from clipforge.data.shapes import ShapesGenerator

    if method not in ("clip", "comclip", "comclip_detected"):
        raise ValueError(f"comclip_arm: method must be clip, comclip or comclip_detected, got '{method}'")
    model, tokenizer = base_model(seed, steps, batch)
    gen = ShapesGenerator("relations", seed=12345, image_size=model.image_size)
    acc = swap_accuracy(ComCLIP(model, tokenizer), [gen.sample(i) for i in range(eval_size)])
    return {"relation": acc[f"{method}_relation"], "swap": acc[f"{method}_swap"]}


comclip_arm.metrics = ("relation", "swap")
