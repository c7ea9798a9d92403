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
_BASES: dict[tuple, object] = {}  # fidelity runs: one base per (seed, steps, batch, precision), shared by the arms
BASE_PRECISION = "bf16"  # TrainConfig's default, in which the recorded runs trained; fidelity --precision changes it


def base_model(seed: int, steps: int, batch: int, precision: str = BASE_PRECISION):
    """The base CLIP that the adaptation arms of one fidelity seed share: ``tiny`` on ``shapes`` trained as TRAIN_ARGS
    say (lr 2e-3, 30 warmup steps, weight decay 0.1), with the run's seed, steps, batch and precision; kept in
    memory."""
    import tempfile

    from clipforge.tokenizer import get_tokenizer
    from clipforge.train import TrainConfig, train

    key = (seed, steps, batch, precision)
    if key not in _BASES:
        with tempfile.TemporaryDirectory(prefix="fidelity-adapt-") as out:
            cfg = TrainConfig(model="tiny", steps=steps, batch_size=batch, lr=2e-3,
                              warmup_steps=min(30, max(1, steps // 10)), weight_decay=0.1, seed=seed, save_every=0,
                              eval_every=0, progress=False, out_dir=out, precision=precision)
            _BASES[key] = train(cfg.validate()).model.eval()
    model = _BASES[key]
    return model, get_tokenizer(model.context_length)


def fidelity_arm(seed: int, steps: int, batch: int, eval_size: int, method: str, shots: int = 16,
                 epochs: int | None = None, precision: str = BASE_PRECISION) -> dict:
    """One arm of the fidelity recipes ``adapt``, ``adapt_prompts`` and ``tca`` (benchmarks/fidelity.py): the base
    model of ``seed`` adapted with ``method`` (``zero-shot``: not adapted; ``tca``: test-time, no support set) on a
    ``shots``-shot support set drawn with ``seed``. ``epochs``: the training epochs of the prompt learners (CoOp,
    TMM, GOPro; None: AdaptConfig's defaults); ``precision``: the base model's (fidelity.py --precision sets it).
    Returns top-1 on ``test`` and ``heldout`` (the 5-way shape view)."""
    model, tokenizer = base_model(seed, steps, batch, precision)
    methods = () if method == "zero-shot" else (method,)
    cfg = AdaptConfig(view="shape", methods=methods or ("tip",), shots=(shots,), seeds=(seed,), size=eval_size)
    if epochs is not None:
        cfg.coop = replace(cfg.coop, epochs=epochs)
        cfg.tmm = replace(cfg.tmm, prompt=replace(cfg.tmm.prompt, epochs=epochs))
        cfg.gopro = replace(cfg.gopro, prompt=replace(cfg.gopro.prompt, epochs=epochs))
    res, _ = run_adaptation(model, tokenizer, cfg)
    if method == "zero-shot":
        return {"test": res["zero_shot"]["test"], "heldout": res["zero_shot"]["heldout"]}
    run = res["test_time"]["tca"] if method == "tca" else res["shots"][str(shots)][method]
    return {"test": run["test"], "heldout": run["heldout"]}


fidelity_arm.metrics = ("test", "heldout")


def fidelity_ood_arm(seed: int, steps: int, batch: int, eval_size: int, method: str, shots: int = 16,
                     precision: str = BASE_PRECISION) -> dict:
    """One arm of the fidelity recipe ``clipn``: the AUROC (in: shapes, out: the suite's OOD set) of the base model of
    ``seed`` with MCM (``method: mcm``, zero-shot) or with CLIPN-style "no" prompts fitted on ``shots`` shots
    (``method: clipn``), under CLIPN's two scores (competing-to-win, agreeing-to-differ; MCM fills both for mcm)."""
    if method not in ("mcm", "clipn"):
        raise ValueError(f"fidelity_ood_arm: method must be mcm or clipn, got '{method}'")
    model, tokenizer = base_model(seed, steps, batch, precision)
    res, _ = run_adaptation(model, tokenizer, AdaptConfig(view="shape", methods=("clipn",), shots=(shots,),
                                                          seeds=(seed,), size=eval_size))
    if method == "mcm":
        return {"auroc_ctw": res["ood"]["mcm"]["auroc"], "auroc_atd": res["ood"]["mcm"]["auroc"]}
    run = res["shots"][str(shots)]["clipn"]
    return {"auroc_ctw": run["auroc_ctw"], "auroc_atd": run["auroc_atd"]}


fidelity_ood_arm.metrics = ("auroc_ctw", "auroc_atd")


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")  # run_adaptation's progress
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "model", nargs="?", default="/tmp/runs/adapt-base", help="a trained run (default /tmp/runs/adapt-base)"
    )
    ap.add_argument("--shots", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--view", default="shape")
    ap.add_argument("--json", help="also write the full results here")
    args = ap.parse_args()
    if not (Path(args.model) / "checkpoints").exists() and not Path(args.model, "config.json").exists():
        print(
            f"no trained model at {args.model}; training one: clipforge train out_dir={args.model} "
            f"{' '.join(TRAIN_ARGS)}"
        )
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
    print(
        f"\n{args.model}: shapes / {res['view']} ({res['num_classes']} classes, chance {res['chance']:.3f}); "
        f"test n={res['n']['test']}, heldout n={res['n']['heldout']}; mean over seeds {args.seeds}; {seconds:.0f} s\n"
    )
    methods = ["tip", "tip-f", "coop", "coop-csc", "gda"]
    names = {
        "tip": "Tip-Adapter",
        "tip-f": "Tip-Adapter-F",
        "coop": "CoOp (shared ctx)",
        "coop-csc": "CoOp (class-specific ctx)",
        "gda": "GDA + zero-shot",
    }
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
