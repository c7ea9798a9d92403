"""MobileCLIP's reinforced dataset in miniature: training on it against plain training, at equal steps.

    python benchmarks/bench_reinforced.py --steps 150 --batch 64 --seed 0

A teacher (the ``tiny`` CLIP trained ``teacher_steps`` steps on shapes, once, shared by every seed) embeds K
stored augmentations of each training image and each of its captions (the sample's own plus rule rewrites):
``clipforge data reinforce`` (:func:`clipforge.train.reinforce.reinforce`), written once into the temp directory.
The student is a fresh ``tiny`` trained for the same number of steps, on the same samples, in one of two arms:

- ``plain``: CLIP's loss on the dataset with the same random augmentation (crop, jitter) drawn on the fly;
- ``reinforced``: ``data.reinforced=DIR`` (one stored view and one stored caption per sample and step) with
  MobileCLIP's objective ``(1 - lam) L_CLIP + lam L_distill`` (``{clip: 1 - lam, distill_kl: lam}``).

Zero-shot and retrieval on held-out shapes (``evaluate_shapes``, the recipe's eval size, seed 12345).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from clipforge.evaluation.shapes_eval import evaluate_shapes
from clipforge.tokenizer import get_tokenizer
from clipforge.train import DataConfig, TrainConfig, train
from clipforge.train.reinforce import reinforce

WORK = Path(tempfile.gettempdir()) / "clipforge_bench_reinforced"
JITTER = 0.2  # the colour jitter of the stored augmentations and of the plain arm's on-the-fly augmentation


def shapes_metrics(model, eval_size: int) -> dict:
    res = evaluate_shapes(model, get_tokenizer(model.context_length), size=eval_size, seed=12345)
    zs, rt = res["zero_shot"], res["retrieval"]["val"]
    return {"object_top1": zs["object"]["top1"], "shape_top1": zs["shape"]["top1"], "color_top1": zs["color"]["top1"],
            "count_top1": zs["count"]["top1"], "i2t_R@1": rt["i2t_R@1"], "t2i_R@1": rt["t2i_R@1"]}


def run_config(out: str, seed: int, steps: int, batch: int, train_size: int, lr: float, **fields) -> TrainConfig:
    return TrainConfig(model="tiny", out_dir=out, seed=seed, steps=steps, batch_size=batch, lr=lr,
                       warmup_steps=max(1, steps // 10), save_every=0, eval_every=0, progress=False,
                       **fields).validate()


def teacher_and_store(teacher_steps: int, train_size: int, k: int, synthetic: int, batch: int, lr: float,
                      eval_size: int) -> tuple[Path, dict]:
    """The teacher run and the reinforced dataset it writes (built once; reused by every seed and arm)."""
    teacher = WORK / f"teacher_s{teacher_steps}_n{train_size}_b{batch}"
    store = WORK / f"store_s{teacher_steps}_n{train_size}_k{k}_c{synthetic}"
    if not (teacher / "done.json").exists():
        result = train(run_config(str(teacher), 0, teacher_steps, batch, train_size, lr,
                                  data=DataConfig(train_size=train_size, eval_size=eval_size)))
        (teacher / "done.json").write_text(json.dumps(shapes_metrics(result.model.eval(), eval_size)))
    if not (store / "reinforce.json").exists():
        reinforce("shapes", [str(teacher)], store, augmentations=k, synthetic=synthetic, size=train_size,
                  image_size=64, jitter=JITTER)
    return store, json.loads((teacher / "done.json").read_text())


def fidelity_arm(seed: int, steps: int, batch: int, eval_size: int, arm: str, teacher_steps: int = 600,
                 train_size: int = 2000, augmentations: int = 4, synthetic: int = 2, lam: float = 0.7,
                 lr: float = 2e-3) -> dict:
    """One arm of the fidelity recipe ``mobileclip_reinforced`` (benchmarks/fidelity.py): ``plain`` or
    ``reinforced``, a ``tiny`` student trained ``steps`` steps of ``batch`` on ``train_size`` shapes samples."""
    if arm not in ("plain", "reinforced"):
        raise ValueError(f"fidelity_arm: arm must be plain or reinforced, got '{arm}'")
    WORK.mkdir(parents=True, exist_ok=True)
    store, teacher = teacher_and_store(teacher_steps, train_size, augmentations, synthetic, batch, lr, eval_size)
    if arm == "plain":
        data = DataConfig(train_size=train_size, eval_size=eval_size, augment=True)
        loss = {"clip": 1.0}
    else:
        data = DataConfig(train_size=train_size, eval_size=eval_size, reinforced=str(store))
        loss = {"clip": 1.0 - lam, "distill_kl": lam}
    with tempfile.TemporaryDirectory(prefix="reinforced-") as out:
        result = train(run_config(out, seed, steps, batch, train_size, lr, data=data, loss=loss))
    t0 = time.perf_counter()
    metrics = shapes_metrics(result.model.eval(), eval_size)
    return {**metrics, "teacher_object_top1": teacher["object_top1"], "teacher_t2i_R@1": teacher["t2i_R@1"],
            "train_s": result.train_seconds, "eval_s": time.perf_counter() - t0}


fidelity_arm.metrics = ("object_top1", "shape_top1", "color_top1", "count_top1", "i2t_R@1", "t2i_R@1",
                        "teacher_object_top1", "teacher_t2i_R@1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--eval-size", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for arm in ("plain", "reinforced"):
        print(json.dumps({"arm": arm, **fidelity_arm(a.seed, a.steps, a.batch, a.eval_size, arm,
                                                       teacher_steps=a.teacher_steps)}), flush=True)


if __name__ == "__main__":
    main()
