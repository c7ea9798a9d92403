"""Few-shot adaptation of a trained CLIP on ``shapes``: zero-shot, Tip-Adapter, Tip-Adapter-F,
CoOp (shared and class-specific context) and GDA at 1/4/16 shots.

    clipforge train out_dir=/tmp/runs/adapt-base steps=400 lr=2e-3 warmup_steps=30 weight_decay=0.1
    OMP_NUM_THREADS=1 python benchmarks/bench_adapt.py /tmp/runs/adapt-base --shots 1 4 16 --seeds 0 1 2

The model trains its own base when the directory has no checkpoint (``--train``, ~3-6 min on
2 cores). Everything runs through :func:`clipforge.evaluation.adaptation.run_adaptation` (what
``clipforge adapt`` runs): support sets from ``train``, alpha/beta chosen on the even half of
``val``, accuracy on the odd half (``test``, in-distribution) and on ``compositional``
(``heldout``: color-shape pairs the base model never saw). Each number is the mean over the
seeds (support-set draws); the table prints ``test`` and ``heldout`` per method and shot
count, plus the OOD AUROC of CLIPN-style "no" prompts against MCM at the largest shot count.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from clipforge.adapt.coop import CoOpConfig
from clipforge.evaluation.adaptation import AdaptConfig, run_adaptation
from clipforge.interop import load

TRAIN_ARGS = ["steps=400", "lr=2e-3", "warmup_steps=30", "weight_decay=0.1"]


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")  # run_adaptation's progress
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="/tmp/runs/adapt-base", help="a trained run (default /tmp/runs/adapt-base)")
    ap.add_argument("--shots", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--view", default="shape")
    ap.add_argument("--json", help="also write the full results here")
    args = ap.parse_args()
    if not (Path(args.model) / "checkpoints").exists() and not Path(args.model, "config.json").exists():
        print(f"no trained model at {args.model}; training one: clipforge train out_dir={args.model} {' '.join(TRAIN_ARGS)}")
        subprocess.run([sys.executable, "-m", "clipforge.cli.main", "train", f"out_dir={args.model}", *TRAIN_ARGS],
                       check=True)
    model, tokenizer, _ = load(args.model)
    base = AdaptConfig(view=args.view, shots=tuple(args.shots), seeds=tuple(args.seeds))
    t0 = time.perf_counter()
    res, _ = run_adaptation(model, tokenizer, replace(base, methods=("tip", "tip-f", "coop", "gda", "clipn")))
    csc, _ = run_adaptation(model, tokenizer, replace(base, methods=("coop",), coop=CoOpConfig(class_specific=True)))
    for k in res["shots"]:
        res["shots"][k]["coop-csc"] = csc["shots"][k]["coop"]
    seconds = time.perf_counter() - t0
    zs = res["zero_shot"]
    print(f"\n{args.model}: shapes / {res['view']} ({res['num_classes']} classes, chance {res['chance']:.3f}); "
          f"test n={res['n']['test']}, heldout n={res['n']['heldout']}; mean over seeds {args.seeds}; {seconds:.0f} s\n")
    methods = ["tip", "tip-f", "coop", "coop-csc", "gda"]
    names = {"tip": "Tip-Adapter", "tip-f": "Tip-Adapter-F", "coop": "CoOp (shared ctx)", "coop-csc": "CoOp (class-specific ctx)",
             "gda": "GDA + zero-shot"}
    for split in ("test", "heldout"):
        header = f"| {split} top-1 | " + " | ".join(f"{k}-shot" for k in args.shots) + " |"
        print(header)
        print("|---|" + "---:|" * len(args.shots))
        print("| zero-shot | " + " | ".join(f"{zs[split]:.3f}" for _ in args.shots) + " |")
        for m in methods:
            cells = []
            for k in args.shots:
                r = res["shots"][str(k)][m]
                spread = np.std([run[split] for run in r["runs"]])
                cells.append(f"{r[split]:.3f} ± {spread:.3f}")
            print(f"| {names[m]} | " + " | ".join(cells) + " |")
        print()
    if "mcm" in res.get("ood", {}):
        k = str(max(args.shots))
        c = res["shots"][k]["clipn"]
        print(f"| OOD (in: shapes, out: textures) | AUROC | FPR@95 |\n|---|---:|---:|\n"
              f"| MCM (zero-shot) | {res['ood']['mcm']['auroc']:.3f} | {res['ood']['mcm']['fpr95']:.3f} |\n"
              f"| CLIPN no prompts, {k}-shot, ctw | {c['auroc_ctw']:.3f} | {c['fpr95_ctw']:.3f} |\n"
              f"| CLIPN no prompts, {k}-shot, atd | {c['auroc_atd']:.3f} | {c['fpr95_atd']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
