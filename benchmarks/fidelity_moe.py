"""CLIP-MoE in miniature (docs/models.md): a dense ``tiny`` CLIP trained on ``shapes``, then the same extra
training budget spent three ways, each evaluated with clipforge's shapes evaluation (zero-shot, retrieval):

- ``dense``: the dense model trained ``--extra`` more steps (every parameter);
- ``moe-copies``: sparse upcycling with identical experts (4 experts, top-2), every parameter trained
  ``--extra`` steps with {clip: 1, moe_balance: 0.01};
- ``moe-dmu``: Diversified Multiplet Upcycling: 3 multiplet stages of ``--stage-steps`` FFN-only steps on
  in-cluster batches, then ``--extra`` steps of router training (routers only, as the official recipe).

Active parameters per token: the MoEs run 2 of 4 experts, so an MoE token passes through twice the dense
FFN width (more compute than ``dense``; equal-active-parameter baselines would need a wider dense FFN,
not done here). One seed per call: preliminary.

    OMP_NUM_THREADS=1 PYTHONPATH=src nice python benchmarks/fidelity_moe.py \
        --base 300 --extra 150 --stage-steps 50 --seed 0
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from clipforge.evaluation import evaluate_shapes
from clipforge.models import save_model
from clipforge.tokenizer import get_tokenizer
from clipforge.train import DataConfig, TrainConfig, train
from clipforge.train.upcycle import MultipletConfig, diversified_multiplet


def summary(ev: dict) -> dict:
    out = {f"zero_shot {k}": round(v["top1"], 3) for k, v in ev["zero_shot"].items()}
    for name, r in ev.get("retrieval", {}).items():
        out.update({f"retrieval {name} {m}": round(r[m], 3) for m in ("i2t_R@1", "t2i_R@1") if m in r})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", type=int, default=300)
    p.add_argument("--extra", type=int, default=150)
    p.add_argument("--stage-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/fidelity_moe")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out) / f"seed{args.seed}"
    data = DataConfig(train_size=args.train_size, seed=args.seed)

    def cfg(name: str, steps: int, **kw) -> TrainConfig:
        return TrainConfig(model="tiny", data=data, batch_size=args.batch_size, steps=steps, lr=1e-3, warmup_steps=20,
                           save_every=0, log_every=25, seed=args.seed, out_dir=str(out / name), progress=False, **kw)

    t0 = time.perf_counter()
    base = train(cfg("base", args.base))
    tok = get_tokenizer(base.model.context_length)
    report = {"args": vars(args), "base": summary(evaluate_shapes(base.model.eval(), tok))}
    runs = {"dense": cfg("dense", args.extra, init_from=base.checkpoint)}
    copies, _ = diversified_multiplet(base.model.eval(), MultipletConfig(experts=4, top_k=2, seed=args.seed))
    save_model(copies, out / "moe-copies-init")
    runs["moe-copies"] = cfg("moe-copies", args.extra, init_from=str(out / "moe-copies-init"),
                             loss={"clip": 1.0, "moe_balance": 0.01})
    dmu, labels = diversified_multiplet(base.model.eval(), MultipletConfig(
        experts=4, top_k=2, stage_steps=args.stage_steps, clusters=4, batch_size=args.batch_size,
        train_size=args.train_size, lr=1e-3, seed=args.seed))
    save_model(dmu, out / "moe-dmu-init")
    report["dmu_pseudo_labels"] = [int(x.max()) + 1 for x in labels]
    report["moe-dmu-init (routers untrained)"] = summary(evaluate_shapes(dmu.eval(), tok))
    runs["moe-dmu"] = cfg("moe-dmu", args.extra, init_from=str(out / "moe-dmu-init"),
                          loss={"clip": 1.0, "moe_balance": 0.01}, trainable=["*.mlp.router.weight"])
    for name, c in runs.items():
        result = train(c)
        report[name] = summary(evaluate_shapes(result.model.eval(), tok))
        print(name, json.dumps(report[name]), flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
