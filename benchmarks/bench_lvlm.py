"""The LLaVA-style LVLM as an embedder, in miniature: caption-only vs discriminative fine-tuning vs UniME.

    python benchmarks/bench_lvlm.py --caption-steps 150 --steps 60 --kd-steps 20 --eval-size 200 --seed 0
    python benchmarks/bench_lvlm.py --speed          # parameters and images/s at batch 32 (docs/performance.md)

The language model is the tiny random Llama of tests/reference/tiny_lm.py (hidden 64, 2 layers, a word-level
vocabulary of the shapes captions), not a pretrained LM: SmolLM2-135M (even cut to 2 layers) trains at several
seconds per step on this shared CPU. All arms start from the same LVLM per seed, trained to caption ``shapes``
(``clipforge lvlm-train --stage caption``, cached on disk), and embed with the last hidden state of the
summarizing prompts (clipforge/models/lvlm.py):

- ``caption``: that LVLM as it is (caption-only embeddings);
- ``discriminative``: ``--steps`` steps of contrastive + next-token loss through soft prompts and LoRA;
- ``unime``: ``--kd-steps`` steps of textual distillation from a teacher (the same tiny LM after
  ``clipforge lm-finetune``'s caption contrast, 60 steps), then ``--steps`` hard-negative steps, LoRA only.

Zero-shot and retrieval on held-out shapes (clipforge.evaluation.evaluate_shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.reference.tiny_lm

from clipforge.evaluation.shapes_eval import evaluate_shapes  # noqa: E402
from clipforge.interop import load  # noqa: E402
from clipforge.train.llm2clip import CaptionContrastConfig, caption_contrast  # noqa: E402
from clipforge.train.lvlm import LVLMTrainConfig, train_lvlm  # noqa: E402
from tests.reference.tiny_lm import make_tiny_lm  # noqa: E402

ARMS = ("caption", "discriminative", "unime")


def _work() -> Path:
    return Path(tempfile.gettempdir()) / "clipforge_bench_lvlm"


def base_lvlm(seed: int, caption_steps: int, train_size: int, hidden: int) -> tuple[Path, Path]:
    """(the tiny LM directory, the caption-stage LVLM directory) of a seed, trained once and cached."""
    lm = _work() / f"lm_h{hidden}_s{seed}"
    if not (lm / "config.json").exists():
        make_tiny_lm(lm, seed=seed, hidden=hidden)
    out = _work() / f"caption_h{hidden}_s{seed}_c{caption_steps}_n{train_size}"
    if not (out / "lvlm_train.json").exists():
        train_lvlm(LVLMTrainConfig(stage="caption", lm=str(lm), steps=caption_steps, train_size=train_size,
                                   lr=2e-3, seed=seed), out)
    return lm, out


def teacher_lm(lm: Path, seed: int, train_size: int) -> Path:
    out = lm.parent / f"{lm.name}_teacher_n{train_size}"
    if not (out / "config.json").exists():
        caption_contrast(CaptionContrastConfig(lm=str(lm), steps=60, batch_size=32, train_size=train_size,
                                               eval_size=200, lr=2e-3, lora_rank=8, seed=seed), out)
    return out


def fidelity_arm(seed: int, steps: int, batch: int, eval_size: int, arm: str, caption_steps: int = 150,
                 kd_steps: int = 20, train_size: int = 2000, hidden: int = 64, lr: float = 1e-3) -> dict:
    """One arm of the fidelity recipe ``lvlm_discriminative`` (benchmarks/fidelity.py)."""
    if arm not in ARMS:
        raise ValueError(f"fidelity_arm: arm must be one of {ARMS}, got '{arm}'")
    lm, base = base_lvlm(seed, caption_steps, train_size, hidden)
    t0 = time.perf_counter()
    path, report = base, json.loads((base / "lvlm_train.json").read_text())
    if arm != "caption":
        path = _work() / f"{arm}_h{hidden}_s{seed}_c{caption_steps}_t{steps}_k{kd_steps}_b{batch}"
        cfg = LVLMTrainConfig(stage=arm, init_from=str(base), steps=steps, batch_size=batch, train_size=train_size,
                              lr=lr, seed=seed, kd_steps=kd_steps,
                              teacher=str(teacher_lm(lm, seed, train_size)) if arm == "unime" else "")
        report = train_lvlm(cfg, path)
    train_s = time.perf_counter() - t0
    model, tokenizer, _ = load(str(path))
    t0 = time.perf_counter()
    with torch.no_grad():
        res = evaluate_shapes(model, tokenizer, size=eval_size, seed=12345)
    zs, rt = res["zero_shot"], res["retrieval"]["val"]
    return {"i2t_R@1": rt["i2t_R@1"], "t2i_R@1": rt["t2i_R@1"], "object_top1": zs["object"]["top1"],
            "shape_top1": zs["shape"]["top1"], "val_caption_loss": report["val_caption_loss_after"],
            "train_s": train_s, "eval_s": time.perf_counter() - t0}


fidelity_arm.metrics = ("i2t_R@1", "t2i_R@1", "object_top1", "shape_top1", "val_caption_loss")


def speed(hidden: int = 64, batch: int = 32, repeats: int = 3) -> dict:
    """Parameters (image tower + projector, LM), forward GFLOPs of one image / one 7-word text embedding and
    images/s of encode_image at batch 32 (one thread)."""
    from clipforge.models import create_model

    lm = _work() / f"lm_h{hidden}_s0"
    if not (lm / "config.json").exists():
        make_tiny_lm(lm, seed=0, hidden=hidden)
    model = create_model("lvlm-tiny", seed=0, lvlm={"path": str(lm)}).eval()
    images = torch.randn(batch, 3, model.image_size, model.image_size)
    with torch.no_grad():
        model.encode_image(images)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.encode_image(images)
            times.append(time.perf_counter() - t0)
    from torch.utils.flop_counter import FlopCounterMode

    from clipforge.interop.text_tokenizers import CausalLMTokenizer

    with torch.no_grad(), FlopCounterMode(display=False) as image_flops:
        model.encode_image(images[:1])
    ids = CausalLMTokenizer(str(lm), model.context_length)(["two small blue squares on the left"])
    with torch.no_grad(), FlopCounterMode(display=False) as text_flops:
        model.encode_text(ids)
    vision = sum(p.numel() for p in model.visual.parameters()) + sum(p.numel() for p in model.projector.parameters())
    return {"vision_and_projector_params": vision, "lm_params": sum(p.numel() for p in model.lm.parameters()),
            "image_tokens": model.visual.grid ** 2, "gflops_per_image": image_flops.get_total_flops() / 1e9,
            "gflops_per_text": text_flops.get_total_flops() / 1e9, "batch": batch,
            "images_per_s": batch / min(times), "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--caption-steps", type=int, default=150)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--kd-steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--speed", action="store_true", help="parameters and images/s at batch 32 only")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.speed:
        print(json.dumps(speed(batch=a.batch)))
        return
    os.makedirs(_work(), exist_ok=True)
    for arm in ARMS:
        print(json.dumps({"arm": arm, **fidelity_arm(a.seed, a.steps, a.batch, a.eval_size, arm, a.caption_steps,
                                                       a.kd_steps)}), flush=True)


if __name__ == "__main__":
    main()
