"""``clipforge eval``: run an evaluation suite on a model and write JSON plus an HTML report.

    clipforge eval runs/a                       # quick suite: zero-shot, retrieval, embedding diagnostics
    clipforge eval runs/a --suite full          # + probes, few-shot, compositionality, counting, OOD, calibration, robustness
    clipforge eval path/to/hf-clip --out rep/   # any checkpoint clipforge.load reads
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_load_arguments, load_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run directory (its newest checkpoint), a checkpoint/model directory, or any source "
                                 "clipforge.load reads (Hugging Face CLIP/SigLIP directory, OpenCLIP or OpenAI weights)")
    p.add_argument("--suite", default="quick",
                   help="quick: zero-shot, retrieval, diagnostics (seconds); full: every task (minutes). Default quick")
    p.add_argument("--dataset", default="shapes", help="shapes (default: its held-out splits) or a built corpus: openclipart, "
                                                      "emoji (clipforge data build NAME)")
    p.add_argument("--data-root", help="where the corpus was built (default $CLIPFORGE_DATA/NAME or ~/.cache/clipforge/data/NAME)")
    p.add_argument("--size", type=int, default=500, help="samples per evaluation split (default 500)")
    p.add_argument("--seed", type=int, default=12345, help="evaluation data seed; differs from training's (default 12345)")
    p.add_argument("--out", help="directory for results.json and report.html (default: <model>/eval-<suite>, or "
                                 "./eval-<suite> when the model is a file)")
    p.add_argument("--cache-dir", help="embedding cache (default ~/.cache/clipforge/embeddings, or $CLIPFORGE_CACHE)")
    p.add_argument("--no-cache", action="store_true", help="encode everything again and store nothing")
    p.add_argument("--no-report", action="store_true", help="write results.json only")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_load_arguments(p)


def summary_rows(results: dict) -> list[list]:
    """(task, metric, value, chance) rows: the headline number of every task that ran."""
    from .common import eval_rows

    results = {k: v for k, v in results.items() if not (isinstance(v, dict) and "skipped" in v)}
    rows = eval_rows(results)
    if "diagnostics" in results:
        d = results["diagnostics"]
        rows += [["embedding space", "modality gap", d["modality_gap"], ""],
                 ["embedding space", "modality classifier accuracy", d["modality_classifier_accuracy"], 0.5]]
    for view, r in results.get("linear_probe", {}).items():
        rows.append([f"linear probe {view} ({r['num_classes']} classes)", "top-1", r["top1"], 1 / r["num_classes"]])
        if "top1_heldout_pairs" in r:
            rows.append([f"linear probe {view} ({r['num_classes']} classes)", "top-1 held-out pairs", r["top1_heldout_pairs"],
                         1 / r["num_classes"]])
    if "few_shot" in results:
        fs = results["few_shot"]
        k = max(fs["shots"], key=int)
        for method, v in fs["shots"][k].items():
            if not method.endswith("_alpha"):
                rows.append([f"few-shot {fs['view']} {k}-shot", method, v, ""])
    if "compositionality" in results:
        for kind, v in results["compositionality"]["per_type"].items():
            rows.append([f"compositionality {kind}", "accuracy", v["accuracy"], v["chance"]])
    if "counting" in results:
        rows.append(["counting (count captions)", "accuracy", results["counting"]["accuracy"], results["counting"]["chance"]])
    if "ood" in results:
        rows += [["OOD (MCM)", "AUROC", results["ood"]["mcm"]["auroc"], 0.5], ["OOD (MCM)", "FPR@95", results["ood"]["mcm"]["fpr95"], 0.95]]
    if "calibration" in results:
        c = results["calibration"]
        rows += [["calibration", "ECE", c["ece"], ""], ["calibration", "ECE after temperature", c["ece_scaled"], ""]]
    if "robustness" in results:
        for sev, v in results["robustness"]["mean_by_severity"].items():
            rows.append(["robustness (mean of 5 corruptions)", f"severity {sev}", v, ""])
    return rows


def run(args) -> int:
    from ..evaluation.cache import DEFAULT_ROOT
    from ..evaluation.report import write_report
    from ..evaluation.suite import run_suite
    from ..interop import load
    from .common import dump_json, table

    model, tokenizer, _ = load(args.model, **load_options(args))
    cache = None if args.no_cache else (args.cache_dir or DEFAULT_ROOT)
    res = run_suite(model, tokenizer, args.suite, dataset=args.dataset, size=args.size, seed=args.seed,
                    cache_dir=cache, progress=not args.quiet, data_root=args.data_root)
    src = Path(args.model)
    name = f"eval-{args.suite}" if args.dataset == "shapes" else f"eval-{args.suite}-{args.dataset}"
    out = Path(args.out) if args.out else (src if src.is_dir() else Path(".")) / name
    if args.no_report:
        import json

        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res.results, indent=2))
        written = [out / "results.json"]
    else:
        written = list(write_report(res.results, res.artifacts, out, title=f"clipforge eval: {args.model}"))
    if args.json:
        print(dump_json(res.results))
    else:
        print(table(summary_rows(res.results), ["task", "metric", "value", "chance"]))
        print("written: " + ", ".join(str(p) for p in written))
    return 0
