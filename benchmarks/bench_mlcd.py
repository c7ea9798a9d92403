"""MLCD's offline step for the fidelity recipe benchmarks/fidelity/mlcd.yaml: a *separate* plain CLIP (its own seed,
trained on the same shapes data as the arms) embeds the training images, and ``clipforge data cluster`` turns its
features into the cluster file the ``mlcd`` arm trains with (``loss: {mlcd: {clusters: "prepared:clusters"}}``).

The paper clusters LAION-400M with off-the-shelf (pretrained CLIP) features; the stand-in here is a CLIP trained
from scratch on the same data, never the model being trained, so the labels are offline as the paper's are.

    python benchmarks/bench_mlcd.py --out /tmp/mlcd-clusters --steps 300     # the preparation step alone
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def offline_clusters(out: str | Path, k: int, teacher_steps: int, teacher_seed: int, batch: int, train_size: int,
                     lr: float, model_overrides: dict | None = None) -> Path:
    """Train the clustering model (plain CLIP, ``teacher_seed``) on ``train_size`` shapes samples (data seed 0, as
    the arms), then ``clipforge data cluster RUN --k K --size N --seed 0 --out FILE``; returns FILE."""
    from clipforge.cli.main import main as clipforge
    from clipforge.train import DataConfig, TrainConfig, train

    out = Path(out)
    run = out / "teacher"
    cfg = TrainConfig(model="tiny", model_overrides=dict(model_overrides or {}), steps=teacher_steps,
                      batch_size=batch, lr=lr, warmup_steps=max(1, teacher_steps // 10), seed=teacher_seed,
                      save_every=0, eval_every=0, progress=False, out_dir=str(run), loss={"clip": 1.0},
                      data=DataConfig(dataset="shapes", train_size=train_size, seed=0))
    train(cfg.validate())
    path = out / f"clusters.k{k}.pt"
    code = clipforge(["data", "cluster", str(run), "--k", str(k), "--dataset", "shapes", "--size", str(train_size),
                      "--seed", "0", "--out", str(path)])
    if code != 0:
        raise RuntimeError(f"clipforge data cluster {run} --k {k} failed (exit {code})")
    return path


offline_clusters.prepares = "a clipforge data cluster file from a separately trained plain CLIP's features"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--lr", type=float, default=2e-3)
    a = p.parse_args()
    path = offline_clusters(a.out, a.k, a.steps, a.seed, a.batch, a.train_size, a.lr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
