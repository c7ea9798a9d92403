"""``clipforge eval``: run an evaluation suite on a model and write JSON plus an HTML report.

clipforge eval runs/a                       # quick suite: zero-shot, retrieval, embedding diagnostics
clipforge eval runs/a --suite full          # + probes, few-shot, compositionality, counting, OOD, calibration,
                                            #   robustness
clipforge eval path/to/hf-clip --out rep/   # any checkpoint clipforge.load reads
clipforge eval runs/a --dataset imagefolder:photos/ --dataset csv:pairs.csv --dataset wds:cifar10/
                                            # your own data: one summary table, one report section per dataset
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_load_arguments, load_options
from .fp32_linear_option import add_fp32_linear_argument, fp32_linears


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="a run directory (its newest checkpoint), a checkpoint/model directory, or any source "
        "clipforge.load reads (Hugging Face CLIP/SigLIP directory, OpenCLIP or OpenAI weights)",
    )
    p.add_argument("--suite", default="quick",
                   help="quick: zero-shot, retrieval, diagnostics (seconds); full: every task (minutes). Default quick")
    p.add_argument(
        "--dataset",
        action="append",
        metavar="SPEC",
        help="repeatable. shapes (default: its held-out splits), a built corpus (openclipart, emoji), or your "
        "own data: imagefolder:DIR (a subfolder per class), wds:DIR (CLIP_benchmark webdataset layout), "
        "csv:FILE / tsv:FILE / jsonl:FILE / parquet:FILE (image-caption manifest; --label-column for "
        "classes), shards:DIR (clipforge data build|convert output)",
    )
    p.add_argument(
        "--data-root", help="where the corpus was built (default $CLIPFORGE_DATA/NAME or ~/.cache/clipforge/data/NAME)"
    )
    p.add_argument("--size", type=int, default=500,
                   help="shapes and built corpora: samples per evaluation split (default 500); the specs of your own "
                        "data (imagefolder:, csv:, shards:, ...) are evaluated whole, as CLIP_benchmark does")
    p.add_argument("--grain-alpha", type=float, metavar="ALPHA",
                   help="shapes only, for a run that trained the grain loss term: also score the zero-shot views with "
                   "GRAIN's region-grounded class descriptions, ALPHA x image-class score + (1 - ALPHA) x description "
                   "score (clipforge.evaluation.descriptions); results under grain_descriptions")
    p.add_argument(
        "--seed", type=int, default=12345, help="evaluation data seed; differs from training's (default 12345)"
    )
    p.add_argument("--out", help="directory for results.json and report.html (default: <model>/eval-<suite>, or "
                                 "./eval-<suite> when the model is a file)")
    p.add_argument("--cache-dir", help="embedding cache (default ~/.cache/clipforge/embeddings, or $CLIPFORGE_CACHE)")
    p.add_argument("--no-cache", action="store_true", help="encode everything again and store nothing")
    p.add_argument("--no-report", action="store_true", help="write results.json only")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("your own data (imagefolder:, wds:, csv:, jsonl:, parquet:, shards: specs)")
    g.add_argument("--split", help="the split of wds:/shards: datasets to evaluate (default test; val for a run "
                                    "trained on its own data whose shard set has no test split)")
    g.add_argument("--templates", default="openai_imagenet",
                   help="prompt templates where the dataset has none: openai_imagenet (80, default), openai_short (7), "
                        "simple ('a photo of a {c}.'), or a file with one template per line ({c} marks the class name)")
    g.add_argument(
        "--classnames", help="file of class names, one per line in class-index order (overrides the dataset's)"
    )
    g.add_argument("--label-column", help="manifests: the column holding the class (integer index or name); "
                                          "shards: the label view (default: the first)")
    g.add_argument(
        "--image-column", default="image", help="manifests: the column holding the image path (default image)"
    )
    g.add_argument("--train-dataset", metavar="SPEC", help="labelled train data for the linear probe and few-shot "
                                                           "adapters (default: the dataset's own train split, if any)")
    g.add_argument("--ood-dataset", metavar="SPEC", help="out-of-distribution images for OOD detection")
    g.add_argument(
        "--tasks",
        help="comma-separated tasks instead of a suite (zero_shot,retrieval,linear_probe,few_shot,"
        "ood,calibration,robustness,diagnostics)",
    )
    g.add_argument("--batch-size", type=int, default=64, help="images per encoding batch (default 64)")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes decoding images (default 2)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: encode under bf16 autocast")
    g.add_argument("--device", default="auto", help="where the model runs for your own data: auto (a GPU when there "
                   "is one, else the CPU; default), cpu, cuda, cuda:N or mps (the built-in suites run on the CPU)")
    add_fp32_linear_argument(p, "encoding (and the linear probe's and adapters' training), on every dataset,")
    add_load_arguments(p)


def summary_rows(results: dict) -> list[list]:
    """(task, metric, value, chance) rows: the headline number of every task that ran."""
    from .common import eval_rows

    results = {k: v for k, v in results.items() if not (isinstance(v, dict) and "skipped" in v)}
    rows = eval_rows(results)
    for view, r in results.get("grain_descriptions", {}).items():
        rows.append([f"zero-shot {view}, GRAIN descriptions (alpha {r['alpha']:g})", "top-1", r["top1"], ""])
    if "diagnostics" in results:
        d = results["diagnostics"]
        rows.append(["embedding space", "modality gap", d["modality_gap"], ""])
        if d.get("modality_classifier_accuracy") is not None:  # None: too few samples to cross-validate
            rows.append(["embedding space", "modality classifier accuracy", d["modality_classifier_accuracy"], 0.5])
    for view, r in results.get("linear_probe", {}).items():
        rows.append([f"linear probe {view} ({r['num_classes']} classes)", "top-1", r["top1"], 1 / r["num_classes"]])
        if "top1_heldout_pairs" in r:
            rows.append(
                [
                    f"linear probe {view} ({r['num_classes']} classes)",
                    "top-1 held-out pairs",
                    r["top1_heldout_pairs"],
                    1 / r["num_classes"],
                ]
            )
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
        rows.append(
            ["counting (count captions)", "accuracy", results["counting"]["accuracy"], results["counting"]["chance"]]
        )
    if "ood" in results:
        rows += [
            ["OOD (MCM)", "AUROC", results["ood"]["mcm"]["auroc"], 0.5],
            ["OOD (MCM)", "FPR@95", results["ood"]["mcm"]["fpr95"], 0.95],
        ]
    if "calibration" in results:
        c = results["calibration"]
        rows += [["calibration", "ECE", c["ece"], ""], ["calibration", "ECE after temperature", c["ece_scaled"], ""]]
    if "robustness" in results:
        for sev, v in results["robustness"]["mean_by_severity"].items():
            rows.append(["robustness (mean of 5 corruptions)", f"severity {sev}", v, ""])
    return rows


def _options(args):
    from ..evaluation.datasets import SpecOptions

    return SpecOptions(split=args.split, templates=args.templates, classnames=args.classnames,
                       label_column=args.label_column, image_column=args.image_column)


def run_default_datasets(model: str) -> tuple[list[str], str | None]:
    """What ``--dataset`` left out means: for a run directory, the held-out data of what it trained on (``shapes``,
    its built corpora, or ``shards:ROOT`` of a shard set, e.g. the one ``data.dataset=csv:FILE`` converted, with its
    ``test`` split, else ``val``) and that split; ``(["shapes"], None)`` otherwise."""
    import yaml

    from ..data.shards import MANIFEST
    from ..evaluation.datasets import is_builtin
    from .train_data import held_out_split

    config = Path(model) / "config.yaml"
    if not config.is_file():
        return ["shapes"], None
    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    dataset, root = str(data.get("dataset") or "shapes"), data.get("root")
    if dataset == "shards" and root and (Path(root) / MANIFEST).is_file():
        split = held_out_split(root)
        if split is not None:
            return [f"shards:{root}"], split
    elif not root and all(is_builtin(part) for part in dataset.split("+")):
        return dataset.split("+"), None
    if dataset != "shapes":
        import logging

        logging.getLogger(__name__).warning(
            "%s trained on data.dataset=%s%s, which has no held-out split to evaluate here: evaluating on shapes "
            "(name the data with --dataset)", model, dataset, f" at {root}" if root else "")
    return ["shapes"], None


def _read_specs(specs: list[str], args) -> tuple[dict, object, object]:
    """Every user spec's metadata, the train split and the OOD set, read before the model loads
    (so a mistake in the last --dataset stops the run before anything is encoded)."""
    from ..evaluation.datasets import is_builtin, load_eval_data, load_train_split

    opts = _options(args)
    data = {spec: load_eval_data(spec, opts) for spec in specs if not is_builtin(spec)}
    train = load_train_split(args.train_dataset, opts) if args.train_dataset else None
    ood = load_eval_data(args.ood_dataset, opts) if args.ood_dataset else None
    return data, train, ood


def _evaluate_one(spec: str, data, train, ood, model, tokenizer, transform, args, cache, tasks):
    """(results, artifacts) of one dataset: the built-in suite data, or a user spec streamed from disk."""
    from ..evaluation.suite import run_suite
    from ..evaluation.user_suite import run_user_suite
    from ..train.device import resolve_device

    if data is None:
        res = run_suite(
            model.cpu(),
            tokenizer,
            args.suite,
            dataset=spec,
            size=args.size,
            seed=args.seed,
            cache_dir=cache,
            progress=not args.quiet,
            data_root=args.data_root,
            tasks=tasks,
        )
        return res.results, res.artifacts
    device = str(resolve_device(args.device))
    model.to(device)
    res = run_user_suite(
        model,
        tokenizer,
        data,
        args.suite,
        tasks,
        cache_dir=cache,
        progress=not args.quiet,
        train=train,
        ood=ood,
        transform=transform,
        batch_size=args.batch_size,
        workers=args.workers,
        precision=args.precision,
        device=device,
    )
    return res.results, res.artifacts


def run(args) -> int:
    import json

    from ..evaluation.cache import DEFAULT_ROOT
    from ..evaluation.clip_benchmark_format import (
        clip_benchmark_records,
        render_multi_report,
        write_clip_benchmark_records,
        write_summary_csv,
    )
    from ..evaluation.datasets import is_builtin
    from ..evaluation.report import write_report
    from ..evaluation.user_suite import resolve_tasks
    from ..interop import load
    from .common import dump_json, table

    specs, split = (args.dataset, None) if args.dataset else run_default_datasets(args.model)
    if not args.dataset and specs != ["shapes"]:
        print(f"no --dataset: evaluating on the held-out data of what {args.model} trained on: {', '.join(specs)}"
              f"{f' (split {args.split or split})' if split else ''}", file=sys.stderr)
    args.split = args.split or split or "test"
    if len(set(specs)) != len(specs):
        raise ValueError(f"--dataset names the same dataset twice ({specs}); give each once")
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError("--batch-size must be at least 1 and --workers at least 0")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    resolve_tasks(args.suite, tasks)  # an unknown suite or task fails before the model loads
    from ..train.device import resolve_device

    resolve_device(args.device)  # so does an absent GPU
    region_tokens = None
    if args.grain_alpha is not None:  # fails before the model loads: wrong dataset, alpha or checkpoint
        from ..evaluation.descriptions import check_alpha, load_region_tokens

        if specs != ["shapes"]:
            raise ValueError(f"--grain-alpha scores shapes' classes with their descriptions; it runs with the "
                             f"default --dataset shapes only, got {specs}")
        check_alpha(args.grain_alpha)
        region_tokens = load_region_tokens(args.model)
    user_data, train, ood = _read_specs(specs, args)
    model, tokenizer, transform = load(args.model, **load_options(args))
    cache = None if args.no_cache else (args.cache_dir or DEFAULT_ROOT)
    with fp32_linears(args.fp32_linear):  # acts on fp32 CPU calls only: bf16 autocast and GPUs run as they did
        per_dataset = {spec: _evaluate_one(spec, user_data.get(spec), train, ood, model, tokenizer, transform, args,
                                           cache, tasks) for spec in specs}
        if region_tokens is not None:
            from ..evaluation.descriptions import evaluate_grain_shapes

            per_dataset["shapes"][0]["grain_descriptions"] = evaluate_grain_shapes(
                model.cpu(), region_tokens, tokenizer, size=args.size, seed=args.seed, alpha=args.grain_alpha)
    src = Path(args.model)
    if args.out:
        out = Path(args.out)
    else:
        tag = specs[0] if len(specs) == 1 else f"{len(specs)}-datasets"
        name = f"eval-{args.suite}" if specs == ["shapes"] else f"eval-{args.suite}-{slug_name(tag)}"
        out = (src if src.is_dir() else Path(".")) / name
    out.mkdir(parents=True, exist_ok=True)
    single = len(specs) == 1
    results = per_dataset[specs[0]][0] if single else {"suite": args.suite, "model": args.model,
                                                       "datasets": {s: r for s, (r, _) in per_dataset.items()}}
    title = f"clipforge eval: {args.model}"
    if args.no_report:
        (out / "results.json").write_text(json.dumps(results, indent=2))
        written = [out / "results.json"]
    elif single and is_builtin(specs[0]):
        written = list(write_report(results, per_dataset[specs[0]][1], out, title=title))
    else:
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "report.html").write_text(
            render_multi_report(per_dataset, title, f"<p>suite <code>{args.suite}</code></p>")
        )
        written = [out / "results.json", out / "report.html"]
    records = [rec for s, (r, _) in per_dataset.items() for rec in clip_benchmark_records(s, args.model, r)]
    write_clip_benchmark_records(out, records)
    rows = [[s, *row] for s, (r, _) in per_dataset.items() for row in summary_rows(r)]
    written.append(write_summary_csv(out / "summary.csv", rows))
    if args.json:
        print(dump_json(results))
    else:
        print(table(rows, ["dataset", "task", "metric", "value", "chance"]))
        for s, (r, _) in per_dataset.items():
            skipped = {t: v["skipped"] for t, v in r.items() if isinstance(v, dict) and "skipped" in v}
            for t, why in skipped.items():
                print(f"{s}: {t} skipped: {why}")
            counts = (r.get("data") or {}).get("test", {}).get("skipped")
            if counts:
                print(f"{s}: images skipped: {counts} (examples in results.json)")
        if records:
            print(f"CLIP_benchmark records: {len(records)} in {out / 'clip_benchmark'}")
        print("written: " + ", ".join(str(p) for p in written))
    return 0


def slug_name(text: str) -> str:
    from ..evaluation.clip_benchmark_format import slug

    return slug(text)
