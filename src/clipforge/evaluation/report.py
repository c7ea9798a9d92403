"""A self-contained HTML report of a suite's results: tables and plots (matplotlib, embedded
as base64 PNG, so the one file can be mailed or opened offline).

Plots, each drawn only when its task ran: confusion matrices of zero-shot classification,
retrieval examples as image grids (the top-5 images for a few captions, the true image
framed in green), the reliability diagram before and after temperature scaling, a 2-D
projection of both modalities that shows the modality gap, OOD score histograms, accuracy
under corruptions by severity, few-shot accuracy by number of shots, and compositionality by
negative type against chance.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(rows: list[list[Any]], header: list[str]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def plot_confusion(confusion: np.ndarray, classnames: list[str], title: str) -> str:
    """Row-normalized confusion; rows only for the classes present in the split (the held-out
    split of a 30-way view holds 5 of them), columns for every class that can be predicted."""
    plt = _pyplot()
    present = np.flatnonzero(confusion.sum(1) > 0)
    rows, n = len(present), len(classnames)
    fig, ax = plt.subplots(figsize=(min(3 + 0.3 * n, 12), min(1.8 + 0.3 * rows, 10)))
    rates = confusion[present] / np.maximum(confusion[present].sum(1, keepdims=True), 1)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(n), classnames, rotation=90, fontsize=7)
    ax.set_yticks(range(rows), [classnames[i] for i in present], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    return _png(fig)


def plot_retrieval_examples(examples: list[dict]) -> str:
    plt = _pyplot()
    top = len(examples[0]["images"])
    fig, axes = plt.subplots(len(examples), top, figsize=(1.6 * top, 1.75 * len(examples)), squeeze=False)
    for r, ex in enumerate(examples):
        for c, (index, image) in enumerate(ex["images"]):
            ax = axes[r][c]
            ax.imshow(np.asarray(image.permute(1, 2, 0)) if hasattr(image, "permute") else np.asarray(image))
            ax.set_xticks([])
            ax.set_yticks([])
            hit = index == ex["truth"]
            for side in ax.spines.values():
                side.set_edgecolor("#1a9641" if hit else "#cccccc")
                side.set_linewidth(4 if hit else 1)
        axes[r][0].set_title(ex["caption"][:60], loc="left", fontsize=8)
    fig.suptitle("text -> image: top images per caption (true image framed green)", fontsize=9)
    return _png(fig)


def plot_reliability(before: dict, after: dict, temperature: float) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), sharey=True)
    for ax, r, title in (
        (axes[0], before, "zero-shot"),
        (axes[1], after, f"temperature-scaled (T = {temperature:.3g})"),
    ):
        edges = np.asarray(r["edges"])
        width = np.diff(edges)
        acc = np.where(np.asarray(r["count"]) > 0, r["accuracy"], 0)
        ax.bar(edges[:-1], acc, width=width, align="edge", edgecolor="black", color="#4575b4", label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set_xlabel("confidence")
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    return _png(fig)


def plot_projection(image: np.ndarray, text: np.ndarray, gap: float | None) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.scatter(image[:, 0], image[:, 1], s=8, alpha=0.6, label="images", color="#d7301f")
    ax.scatter(text[:, 0], text[:, 1], s=8, alpha=0.6, label="captions", color="#2b8cbe")
    for i in range(0, len(image), max(1, len(image) // 30)):  # a few pair links
        ax.plot([image[i, 0], text[i, 0]], [image[i, 1], text[i, 1]], color="gray", lw=0.4, alpha=0.5)
    ax.set_title("both modalities, first two principal axes" + (f"\nmodality gap {gap:.3f}" if gap is not None else ""),
                 fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_ood(scores: dict) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(
        min(scores["in"].min(), scores["out"].min()), max(scores["in"].max(), scores["out"].max()) + 1e-9, 30
    )
    ax.hist(scores["in"], bins=bins, alpha=0.6, label="in-distribution", color="#1a9641")
    ax.hist(scores["out"], bins=bins, alpha=0.6, label=f"out ({scores['out_name']})", color="#d7191c")
    ax.set_xlabel("MCM score (max softmax over class prompts)")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_lines(series: dict[str, dict[str, float]], xlabel: str, title: str, chance: float | None = None) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, points in series.items():
        xs = list(points)
        ax.plot(range(len(xs)), [points[x] for x in xs], marker="o", label=name)
        ax.set_xticks(range(len(xs)), xs)
    if chance is not None:
        ax.axhline(chance, color="gray", ls=":", label="chance")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def plot_bars(labels: list[str], values: list[float], chance: list[float], title: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = np.arange(len(labels))
    ax.bar(x, values, color="#4575b4", label="accuracy")
    ax.scatter(x, chance, color="black", marker="_", s=400, label="chance", zorder=3)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


# ------------------------------------------------------------------------------ the sections
def _section(title: str, *parts: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


def _zero_shot(res, art) -> str:
    rows = [[t, r["num_classes"], r["top1"], r.get("top5", ""), r["balanced_accuracy"], r["chance_top1"], r["n"]]
            for t, r in res.items()]
    plots = "".join(
        plot_confusion(a["confusion"], a["classnames"], f"zero-shot {t}") for t, a in art.items()
    )  # {} without artifacts
    return _section(
        "Zero-shot classification",
        _table(rows, ["task", "classes", "top-1", "top-5", "balanced", "chance", "n"]),
        f'<div class="plots">{plots}</div>',
    )


def _retrieval(res, art) -> str:
    rows = [[name, r["i2t_R@1"], r["i2t_R@5"], r["i2t_R@10"], r["t2i_R@1"], r["t2i_R@5"], r["t2i_R@10"],
             r["i2t_median_rank"], r["t2i_median_rank"], r["t2i_R@1_chance"]] for name, r in res.items()]
    return _section(
        "Retrieval",
        _table(
            rows,
            [
                "set",
                "i2t R@1",
                "R@5",
                "R@10",
                "t2i R@1",
                "R@5",
                "R@10",
                "i2t median rank",
                "t2i median rank",
                "t2i R@1 chance",
            ],
        ),
        plot_retrieval_examples(art["examples"]) if "examples" in art else "",
    )


def _diagnostics(res, art) -> str:
    rows = [[k, v] for k, v in res.items()]
    return _section("Embedding space", _table(rows, ["diagnostic", "value"]),
                    plot_projection(art["projection"]["image"], art["projection"]["text"], res.get("modality_gap"))
                    if "projection" in art else "")


def _linear(res, art) -> str:
    rows = [[view, r["num_classes"], r["top1"], r.get("top1_heldout_pairs", "—"), r["C"], r["n_train"], r["n_test"]]
            for view, r in res.items()]
    return _section(
        "Linear probe",
        _table(
            rows,
            ["view", "classes", "test top-1", "held-out pairs top-1", "C (chosen on val)", "n train+val", "n test"],
        ),
    )


def _few_shot(res, art) -> str:
    methods = sorted({m for row in res["shots"].values() for m in row if not m.endswith("_alpha")})
    series = {m: {k: row[m] for k, row in res["shots"].items() if m in row} for m in methods}
    series["zero-shot"] = {k: res["zero_shot"] for k in res["shots"]}
    rows = [[k] + [row.get(m, "") for m in methods] for k, row in res["shots"].items()]
    return _section(f"Few-shot ({res['view']})", _table(rows, ["shots"] + methods),
                    plot_lines(series, "shots per class", "few-shot accuracy (in-distribution test half)"))


def _compositionality(res, art) -> str:
    per = res["per_type"]
    rows = [[k, v["accuracy"], v["chance"], v["n"]] for k, v in per.items()]
    return _section(
        "Compositionality (true caption beats its hard negatives)",
        _table(rows, ["negative type", "accuracy", "chance", "n"])
        + f"<p>macro accuracy {res['macro_accuracy']:.3f}</p>",
        plot_bars(
            list(per),
            [v["accuracy"] for v in per.values()],
            [v["chance"] for v in per.values()],
            "accuracy by negative type",
        ),
    )


def _counting(res, art) -> str:
    return _section("Counting (choose among captions that differ only in the number)",
                    _table([[res["accuracy"], res["chance"], res["n"]]], ["accuracy", "chance", "n"]))


def _ood(res, art) -> str:
    m = res["mcm"]
    return _section(
        "Out-of-distribution detection",
        _table(
            [["MCM", m["auroc"], m["fpr95"], m["n_in"], m["n_out"]]], ["score", "AUROC", "FPR@95%TPR", "n in", "n out"]
        ),
        f"<p>in: {html.escape(res['in'])}; out: {html.escape(res['out'])}. CLIPN: {html.escape(res['clipn'])}</p>",
        plot_ood(art["mcm"]) if "mcm" in art else "",
    )


def _calibration(res, art) -> str:
    rows = [
        ["zero-shot", res["ece"], res["nll"]],
        [f"temperature {res['temperature']:.3g}", res["ece_scaled"], res["nll_scaled"]],
    ]
    return _section(f"Calibration ({res['view']}, {res['bins']} bins)", _table(rows, ["", "ECE", "NLL"]),
                    plot_reliability(art["before"], art["after"], art["temperature"]) if "before" in art else "")


def _robustness(res, art) -> str:
    rows = [[c] + list(v.values()) for c, v in res["corruptions"].items()]
    sev = list(next(iter(res["corruptions"].values())))
    return _section(f"Robustness ({res['view']}, clean accuracy {res['clean']:.3f})",
                    _table(rows, ["corruption"] + [f"severity {s}" for s in sev]),
                    plot_lines(res["corruptions"], "severity", "zero-shot accuracy under corruptions"))


SECTIONS = {"zero_shot": _zero_shot, "retrieval": _retrieval, "diagnostics": _diagnostics, "linear_probe": _linear,
            "few_shot": _few_shot, "compositionality": _compositionality, "counting": _counting, "ood": _ood,
            "calibration": _calibration, "robustness": _robustness}

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td:first-child{text-align:left}section{margin-bottom:2em}.plots img{margin:4px}
img{max-width:100%}code{background:#f4f4f4;padding:1px 4px}"""


def render_report(results: dict, artifacts: dict, title: str) -> str:
    """The HTML page. ``artifacts`` may be partial or empty (e.g. results read back from JSON):
    tables are always drawn, plots only where their data is present."""
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>suite <code>{html.escape(str(results.get('suite')))}</code> on "
        f"<code>{html.escape(str(results.get('dataset')))}</code>, "
        f"{results.get('size')} samples per split, seed {results.get('seed')}; embedding cache "
        f"{results.get('cache', {}).get('hits', 0)} hits / {results.get('cache', {}).get('misses', 0)} encodings</p>",
    ]
    for name, section in SECTIONS.items():
        if name in results and isinstance(results[name], dict) and "skipped" in results[name]:
            parts.append(
                f"<section><h2>{html.escape(name)}</h2><p>skipped: "
                f"{html.escape(results[name]['skipped'])}</p></section>"
            )
        elif name in results:
            parts.append(section(results[name], artifacts.get(name, {})))
    parts.append(
        "<details><summary>all numbers "
        f"(JSON)</summary><pre>{html.escape(json.dumps(results, indent=1))}</pre></details>"
    )
    head = f"<head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head>"
    return f"<!doctype html><html>{head}<body>{''.join(parts)}</body></html>"


def write_report(
    results: dict, artifacts: dict, out_dir: str | Path, title: str = "clipforge evaluation"
) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.html`` into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.html").write_text(render_report(results, artifacts, title))
    return out / "results.json", out / "report.html"
