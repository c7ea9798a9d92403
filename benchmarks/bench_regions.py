"""Fidelity plug-ins for the region methods (benchmarks/fidelity/cloc.yaml, comclip.yaml).

- ``regions(model, eval_size)``: :func:`clipforge.evaluation.regions.evaluate_regions` on ``eval_size`` val
  scenes: the model's own region embeddings (the region head when it has one, else crop-and-encode) and, for
  every model, crop-and-encode, so a CLOC arm is compared with plain CLIP's crops and with its own crops.
- ``comclip_arm(seed, steps, batch, eval_size, method)``: the base model of ``seed`` (bench_adapt.base_model,
  shared with the adapter recipes) scored on ``eval_size`` scenes of shapes' relations split by plain CLIP
  (``clip``) or ComCLIP with the scene's boxes (``comclip``) or with the component detector (``comclip_detected``).
- ``grain_descriptions_arm(seed, steps, batch, eval_size, alpha, train)``: trains the TrainConfig fields ``train``
  (a run with the ``grain`` term) with the run's seed, steps and batch, reads the region tokens back from its
  checkpoint and scores the shapes views with GRAIN's test-time description scoring
  (:func:`clipforge.evaluation.descriptions.evaluate_grain_shapes`, weight ``alpha`` on the image-class score);
  retrieval is the global embeddings' (benchmarks/fidelity/grain.yaml).
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


def comclip_arm(seed: int, steps: int, batch: int, eval_size: int, method: str, precision: str = "bf16") -> dict:
    """One arm of the fidelity recipe ``comclip``: the adapter recipes' base model of ``seed`` (trained in
    ``precision``, bench_adapt.BASE_PRECISION unless fidelity.py --precision says otherwise) scoring relation
    captions against their flipped and swapped negatives with whole images (``clip``) or as ComCLIP does."""
    from bench_adapt import base_model

    from clipforge.adapt.comclip import ComCLIP, swap_accuracy
    from clipforge.data.shapes import ShapesGenerator

    if method not in ("clip", "comclip", "comclip_detected"):
        raise ValueError(f"comclip_arm: method must be clip, comclip or comclip_detected, got '{method}'")
    model, tokenizer = base_model(seed, steps, batch, precision)
    gen = ShapesGenerator("relations", seed=12345, image_size=model.image_size)
    acc = swap_accuracy(ComCLIP(model, tokenizer), [gen.sample(i) for i in range(eval_size)])
    return {"relation": acc[f"{method}_relation"], "swap": acc[f"{method}_swap"]}


comclip_arm.metrics = ("relation", "swap")


def grain_descriptions_arm(seed: int, steps: int, batch: int, eval_size: int, alpha: float, train: dict) -> dict:
    import tempfile

    from omegaconf import OmegaConf

    from clipforge.evaluation import evaluate_shapes
    from clipforge.evaluation.descriptions import evaluate_grain_shapes, load_region_tokens
    from clipforge.tokenizer import get_tokenizer
    from clipforge.train import TrainConfig
    from clipforge.train import train as run_training

    fields = {k: v for k, v in train.items() if k != "loss"}
    fields.update(steps=steps, batch_size=batch, seed=seed, save_every=0, eval_every=0, progress=False)
    fields.setdefault("warmup_steps", max(1, steps // 10))  # as the fidelity runner does for training arms
    with tempfile.TemporaryDirectory(prefix="fidelity-grain-") as out:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create({**fields, "out_dir": out}))
        OmegaConf.update(merged, "loss", train["loss"], merge=False)
        result = run_training(OmegaConf.to_object(merged).validate())
        tokens = load_region_tokens(result.checkpoint)
    model = result.model.eval()
    tok = get_tokenizer(model.context_length)
    grain = evaluate_grain_shapes(model, tokens, tok, size=eval_size, seed=12345, alpha=alpha)
    ev = evaluate_shapes(model, tok, size=eval_size, seed=12345)
    return {"object_top1": grain["object"]["top1"], "shape_top1": grain["shape"]["top1"],
            "color_top1": grain["color"]["top1"], "i2t_R@1": ev["retrieval"]["val"]["i2t_R@1"],
            "global_object_top1": grain["object"]["global_top1"],
            "description_object_top1": grain["object"]["description_top1"],
            "suite_object_top1": ev["zero_shot"]["object"]["top1"], "train_s": result.train_seconds}


grain_descriptions_arm.metrics = ("object_top1", "shape_top1", "color_top1", "i2t_R@1", "global_object_top1",
                                  "description_object_top1", "suite_object_top1")
