"""Outputs of a multi-dataset ``clipforge eval`` run: CLIP_benchmark's result records, a
``summary.csv`` across datasets and one HTML report with a section per dataset.

CLIP_benchmark's record (what its ``clip_benchmark eval`` dumps per dataset and task)::

    {"dataset": ..., "model": ..., "pretrained": ..., "task": "zeroshot_classification",
     "metrics": {"acc1": ..., "acc5": ..., "mean_per_class_recall": ...}, "language": "en"}

``zeroshot_retrieval`` metrics are ``image_retrieval_recall@k`` (text -> image, clipforge's
``t2i_R@k``) and ``text_retrieval_recall@k`` (image -> text, ``i2t_R@k``); ``linear_probe``
metrics are ``lp_acc1``. Like CLIP_benchmark, ``acc5`` is not a number (JSON ``null`` here)
when a dataset has fewer than 5 classes.
"""
from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path
from typing import Any

RETRIEVAL_KS = (1, 5, 10)


def clip_benchmark_records(dataset: str, model: str, results: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per task that ran on ``dataset`` (zero-shot per label view, retrieval per set, linear probe)."""
    base = {"dataset": dataset, "model": model, "pretrained": "", "language": "en"}
    out = []
    zs = results.get("zero_shot")
    if isinstance(zs, dict) and "skipped" not in zs:
        for view, r in zs.items():
            metrics = {"acc1": r["top1"], "acc5": r["top5"] if r["num_classes"] >= 5 else None,
                       "mean_per_class_recall": r["balanced_accuracy"]}
            out.append({**base, "task": "zeroshot_classification", "view": view, "metrics": metrics})
    rt = results.get("retrieval")
    if isinstance(rt, dict) and "skipped" not in rt:
        for split, r in rt.items():
            metrics = {}
            for k in RETRIEVAL_KS:
                metrics[f"image_retrieval_recall@{k}"] = r[f"t2i_R@{k}"]
                metrics[f"text_retrieval_recall@{k}"] = r[f"i2t_R@{k}"]
            out.append({**base, "task": "zeroshot_retrieval", "split": split, "metrics": metrics})
    lp = results.get("linear_probe")
    if isinstance(lp, dict) and "skipped" not in lp:
        for view, r in lp.items():
            out.append({**base, "task": "linear_probe", "view": view, "metrics": {"lp_acc1": r["top1"]}})
    return out


def slug(text: str) -> str:
    """A file-name-safe form of a dataset spec or model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:120] or "dataset"


def write_clip_benchmark_records(out_dir: str | Path, records: list[dict[str, Any]]) -> list[Path]:
    """``out_dir/clip_benchmark/<dataset>_<task>.json``, one record per file as CLIP_benchmark writes them."""
    folder = Path(out_dir) / "clip_benchmark"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in records:
        extra = r.get("view") or r.get("split")
        name = f"{slug(r['dataset'])}_{r['task']}" + (
            f"_{slug(extra)}" if extra and extra not in ("label", "test") else ""
        )
        path = folder / f"{name}.json"
        path.write_text(json.dumps(r, indent=1))
        paths.append(path)
    return paths


def write_summary_csv(path: str | Path, rows: list[list[Any]]) -> Path:
    """Rows (dataset, task, metric, value, chance) as CSV."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "task", "metric", "value", "chance"])
        for r in rows:
            w.writerow(r)
    return path


def render_multi_report(per_dataset: dict[str, tuple[dict, dict]], title: str, header: str = "") -> str:
    """One HTML page with a section per dataset, each holding the suite report's task sections."""
    from .report import SECTIONS, STYLE

    parts = [f"<h1>{html.escape(title)}</h1>", header]
    nav = "".join(f'<li><a href="#ds{i}">{html.escape(name)}</a></li>' for i, name in enumerate(per_dataset))
    parts.append(f"<ul>{nav}</ul>")
    for i, (name, (results, artifacts)) in enumerate(per_dataset.items()):
        body = []
        info = results.get("data")
        if info:
            body.append(f"<p>data: <code>{html.escape(json.dumps(info)[:2000])}</code></p>")
        for task, section in SECTIONS.items():
            if task not in results:
                continue
            if isinstance(results[task], dict) and "skipped" in results[task]:
                body.append(
                    f"<section><h3>{html.escape(task)}</h3><p>skipped: {html.escape(results[task]['skipped'])}</p>"
                    "</section>"
                )
            else:
                body.append(
                    section(results[task], artifacts.get(task, {})).replace("<h2>", "<h3>").replace("</h2>", "</h3>")
                )
        parts.append(f'<article id="ds{i}"><h2>{html.escape(name)}</h2>{"".join(body)}</article>')
    everything = {name: r for name, (r, _) in per_dataset.items()}
    parts.append(f"<details><summary>all numbers (JSON)</summary><pre>{html.escape(json.dumps(everything, indent=1))}"
                 "</pre></details>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}"
            f"article{{border-top:3px solid #888;margin-top:2em}}</style></head><body>{''.join(parts)}</body></html>")


__all__ = ["clip_benchmark_records", "render_multi_report", "slug", "write_clip_benchmark_records", "write_summary_csv"]
