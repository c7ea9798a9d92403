"""``clipforge link``: record linkage with pooled image+text CLIP embeddings (CLIPPINGS).

    clipforge link records.jsonl --model runs/a --out links.csv
    clipforge link records.csv --model runs/a --method cluster --threshold 0.7 --out links.csv
    clipforge link test.jsonl --model runs/a --finetune train.jsonl --steps 200 --out links.csv

See :mod:`clipforge.adapt.clippings` and docs/retrieval_systems.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from .common import add_load_arguments, add_overwrite_argument, check_output_dir, load_options

EPILOG = """\
records: a .jsonl (one object per line) or .csv file with the fields
  id       a unique name of the record (default: its line number)
  image    the record's image, a path relative to the records file's folder
  text     the record's text (a name, an OCR line, a caption)
  entity   optional: the true entity; with it the pairwise precision/recall/F1 and the adjusted
           Rand index of the linkage are printed and written to OUT.summary.json
Every record needs both an image and a text (CLIPPINGS pools the two).

what is written (--out links.csv), one row per record:
  id, entity (the linked group, numbered from 0), nearest_id and nearest_cosine (its nearest other
  record under --modality), linked (nn: whether that nearest neighbour passed --threshold)

--finetune TRAIN: first fine-tune both towers with the supervised contrastive loss on the records
of TRAIN (which need entity), batches of --batch-entities entities x --per-entity records.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("records", help="the records to link: .jsonl or .csv with id, image, text[, entity]")
    p.add_argument("--model", required=True,
                   help="a CLIP: run directory, checkpoint, or any source clipforge.load reads")
    p.add_argument("--out", required=True, help="the links .csv to write")
    p.add_argument("--method", choices=["nn", "cluster"], default="nn",
                   help="nn: link each record to its nearest neighbour above --threshold, entities are the connected "
                        "groups (default); cluster: average-linkage agglomerative clustering cut at 1 - --threshold")
    p.add_argument("--threshold", type=float, default=0.8, help="cosine similarity needed to link (default 0.8)")
    p.add_argument("--modality", choices=["pooled", "image", "text"], default="pooled",
                   help="pooled image+text embeddings (CLIPPINGS, default), or one tower alone (the baselines)")
    p.add_argument("--finetune", metavar="TRAIN_RECORDS", help="records with entity to fine-tune on first")
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps (default 100)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    p.add_argument("--batch-entities", type=int, default=16, help="entities per fine-tuning batch (default 16)")
    p.add_argument("--per-entity", type=int, default=4, help="records per entity in a batch (default 4)")
    p.add_argument("--temperature", type=float, default=0.1, help="supervised contrastive temperature (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fine-tuning batches")
    p.add_argument("--save-model", metavar="DIR", help="save the fine-tuned model here (clipforge model directory)")
    add_overwrite_argument(p, "--save-model")
    add_load_arguments(p)


def run(args) -> int:
    import torch

    from ..adapt.clippings import FinetuneConfig, embed_records, finetune, link_clusters, link_nearest, read_records
    from ..adapt.clippings import load_records as load_pixels
    from ..interop import load
    from ..metrics import adjusted_rand_index, pairwise_linkage_metrics

    check_output_dir(args.save_model, args.overwrite, "--save-model")  # before anything loads or trains
    out = Path(args.out)
    if out.suffix != ".csv":
        raise ValueError(f"--out must end in .csv, got '{out.name}'")
    if not -1.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold is a cosine in [-1, 1], got {args.threshold}")
    records = read_records(args.records)
    train = read_records(args.finetune) if args.finetune else None
    if train is not None and train.entities is None:
        raise ValueError(f"--finetune {args.finetune}: every record needs an entity to fine-tune on (the field "
                         "'entity')")
    model, tokenizer, preprocess = load(args.model, **load_options(args))
    if train is not None:
        cfg = FinetuneConfig(steps=args.steps, lr=args.lr, batch_entities=args.batch_entities,
                             per_entity=args.per_entity, temperature=args.temperature, modality=args.modality,
                             seed=args.seed)
        pixels, tokens = load_pixels(train, preprocess, tokenizer)
        names = sorted(set(train.entities))
        history = finetune(model, pixels, tokens, [names.index(e) for e in train.entities], cfg)
        print(f"fine-tuned {cfg.steps} steps on {len(train)} records of {len(names)} entities; loss "
              f"{history[0]:.4f} -> {history[-1]:.4f}" if history else "fine-tuning: 0 steps", file=sys.stderr)
        if args.save_model:
            from ..models import save_model

            save_model(model.eval(), args.save_model)
    pixels, tokens = load_pixels(records, preprocess, tokenizer)
    with torch.no_grad():
        z = embed_records(model, pixels, tokens, args.modality)
    comp, nn, score = link_nearest(z, args.threshold)
    if args.method == "cluster":
        comp = link_clusters(z, args.threshold)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "entity", "nearest_id", "nearest_cosine", "linked"])
        for i, rid in enumerate(records.ids):
            w.writerow([rid, int(comp[i]), records.ids[int(nn[i])], f"{float(score[i]):.6f}",
                        bool(score[i] >= args.threshold)])
    n_groups = len(set(comp.tolist()))
    print(f"linked {len(records)} records into {n_groups} entities ({args.method}, {args.modality}, threshold "
          f"{args.threshold}); wrote {out}")
    if records.entities is not None:
        summary = {"records": len(records), "true_entities": len(set(records.entities)), "predicted_entities": n_groups,
                   "method": args.method, "modality": args.modality, "threshold": args.threshold,
                   **pairwise_linkage_metrics(records.entities, comp),
                   "adjusted_rand_index": adjusted_rand_index(records.entities, comp)}
        out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary))
    return 0
