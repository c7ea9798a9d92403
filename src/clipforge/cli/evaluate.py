"""``clipforge eval``: zero-shot classification and retrieval of a trained model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run directory (uses its newest checkpoint) or a checkpoint/model directory")
    p.add_argument("--dataset", default="shapes", help="evaluation dataset (default: shapes held-out splits)")
    p.add_argument("--size", type=int, default=500, help="samples per evaluation split (default 500)")
    p.add_argument("--out", help="write the full results (per-class accuracy, confusion matrices) as JSON here")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")


def run(args) -> int:
    from ..evaluation import evaluate_shapes
    from ..models import load_model
    from ..tokenizer import get_tokenizer
    from .common import dump_json, eval_rows, table

    if args.dataset != "shapes":
        raise ValueError(f"dataset '{args.dataset}' has no evaluation tasks yet; available: shapes")
    model = load_model(args.model)
    results = evaluate_shapes(model, get_tokenizer(model.context_length), size=args.size, detailed=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    if args.json:
        print(dump_json(results))
    else:
        print(table(eval_rows(results), ["task", "metric", "value", "chance"]))
        if args.out:
            print(f"full results written to {args.out}")
    return 0
