"""Where the time of one clipforge training step goes, by category (torch.profiler, CPU).

    python benchmarks/profile_train_step.py [--model tiny] [--overrides JSON] [--batch 128]
        [--precision bf16] [--steps 3] [--threads 2] [--sdpa] [--table] [--gemms [--peak GFLOPS]]

Profiles a few steps after warm-up and sums each op's *self* time into: GEMMs (mm, addmm,
bmm, baddbmm), attention softmax, LayerNorm, GELU, elementwise (adds, muls, fills: bias and
residual gradients), reductions (bias-gradient sums), autocast casts (``copy_`` under
``_to_copy``), layout copies (other ``copy_``: contiguous/reshape of strided views),
optimizer (AdamW), loss, and the rest. ``--sdpa`` routes attention through
``F.scaled_dot_product_attention`` (the path before ``short_attention``) for comparison;
``--table`` also prints the profiler's top ops.

``--gemms`` also prints every GEMM of the step by operator and operand shapes: calls and milliseconds
per step, FLOPs (2 per multiply-accumulate, from the shapes) and the rate each ran at, then the rate of
all GEMMs together and the step's FLOP/s. All of the step's FLOPs are in its GEMMs, so the GEMMs'
own rate is what the step's MFU would be if everything else took no time: with ``--peak`` (the
machine's GFLOP/s from ``bench_peak.py``) both are printed as a share of it.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

CATEGORIES = [
    ("GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("softmax", ("aten::_softmax", "aten::_softmax_backward_data", "aten::_safe_softmax")),
    ("LayerNorm", ("aten::native_layer_norm", "aten::native_layer_norm_backward")),
    ("GELU", ("aten::gelu", "aten::gelu_backward")),
    ("optimizer (AdamW)", ("aten::_fused_adamw_", "aten::_foreach_")),
    ("loss", ("aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss", "aten::nll_loss_backward")),
    ("reductions (bias grads)", ("aten::sum",)),
    (
        "elementwise (add/mul/fill/where)",
        (
            "aten::add",
            "aten::add_",
            "aten::mul",
            "aten::mul_",
            "aten::fill_",
            "aten::where",
            "aten::zero_",
            "aten::div",
            "aten::isneginf",
            "aten::all",
            "aten::tril",
        ),
    ),
    ("patch embedding conv", ("aten::mkldnn_convolution", "aten::convolution_backward")),
]


def categorize(name: str, parent: str | None) -> str:
    if name == "aten::copy_":
        return "autocast casts" if parent == "aten::_to_copy" else "layout copies"
    for cat, prefixes in CATEGORIES:
        if any(name == p or (p.endswith("_") and name.startswith(p)) for p in prefixes):
            return cat
    if (
        name.startswith("Compiled")
        or "inductor" in name.lower()
        or name.startswith("cpp_fused")
        or name.startswith("graph_")
    ):
        return "compiled kernels"
    return "other"


def gemm_flops(name: str, shapes: list) -> int:
    """FLOPs of one GEMM call from its operand shapes as the profiler records them (2 per multiply-accumulate):
    ``mm`` [M, K] x [K, N]; ``addmm`` (bias, [M, K], [K, N]); ``bmm`` [B, M, K] x [B, K, N]; ``baddbmm``
    (input, [B, M, K], [B, K, N])."""
    if name == "aten::mm":
        (m, k), (_, n) = shapes[0], shapes[1]
        return 2 * m * k * n
    if name == "aten::addmm":
        (m, k), (_, n) = shapes[1], shapes[2]
        return 2 * m * k * n
    if name == "aten::bmm":
        (b, m, k), (_, _, n) = shapes[0], shapes[1]
        return 2 * b * m * k * n
    if name == "aten::baddbmm":
        (b, m, k), (_, _, n) = shapes[1], shapes[2]
        return 2 * b * m * k * n
    raise ValueError(f"not a GEMM operator: {name}")


def gemm_rows(events) -> tuple[dict[tuple[str, str], list], float]:
    """({(operator, operand shapes): [calls, self microseconds, FLOPs]} of the GEMMs among the profiler ``events``
    (recorded with ``record_shapes=True``), microseconds of every op's self time together)."""
    rows: dict[tuple[str, str], list] = {}
    total_us = 0.0
    for ev in events:
        if not (ev.name.startswith("aten::") or ev.name.startswith("cpp_fused")):
            continue
        total_us += ev.self_cpu_time_total
        if ev.name not in CATEGORIES[0][1]:
            continue
        shapes = [list(s) for s in ev.input_shapes if s]
        row = rows.setdefault((ev.name, " x ".join("x".join(map(str, s)) for s in shapes)), [0, 0.0, 0])
        row[0] += 1
        row[1] += ev.self_cpu_time_total
        row[2] += gemm_flops(ev.name, shapes)
    return rows, total_us


def gemm_table(rows: dict, total_us: float, steps: int, peak: float | None = None) -> list[str]:
    """Markdown lines from :func:`gemm_rows`: each operator and shapes with calls and ms per step, GFLOP per step and
    GFLOP/s, the largest time first; then the GEMMs' combined rate and the step's (all of its ops' self time)."""
    out = ["| operator | operand shapes | calls / step | ms / step | GFLOP / step | GFLOP/s |",
           "|---|---|---:|---:|---:|---:|"]
    for (name, shape), (calls, us, flops) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        out.append(f"| {name.removeprefix('aten::')} | {shape} | {calls / steps:g} | {us / 1e3 / steps:.2f} "
                   f"| {flops / 1e9 / steps:.3f} | {flops / max(us, 1e-9) / 1e3:.0f} |")
    gemm_us, flops = sum(r[1] for r in rows.values()), sum(r[2] for r in rows.values())
    gemm_rate, step_rate = flops / max(gemm_us, 1e-9) / 1e3, flops / max(total_us, 1e-9) / 1e3
    of = (lambda r: f" ({100 * r / peak:.1f}% of {peak:g})") if peak else (lambda r: "")
    return out + ["", f"GEMMs: {gemm_us / 1e3 / steps:.1f} ms of a {total_us / 1e3 / steps:.1f} ms step, "
                      f"{flops / 1e9 / steps:.2f} GFLOP, {gemm_rate:.0f} GFLOP/s{of(gemm_rate)}; "
                      f"the step: {step_rate:.0f} GFLOP/s{of(step_rate)}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--overrides", default="{}")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--sdpa", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--gemms", action="store_true", help="also every GEMM by shape, with its FLOP/s")
    ap.add_argument("--peak", type=float, default=None,
                    help="with --gemms: the machine's GFLOP/s (bench_peak.py), to print rates as a share of it")
    ap.add_argument("--texts", default="random", choices=["random", "shapes"],
                    help="one batch of uniform random tokens, or shapes captions (bench_train_throughput.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bench_train_throughput import clipforge_optimizer, make_images, make_texts, model_spec, train_step
    from torch.profiler import ProfilerActivity, profile

    import clipforge.models.transformer as transformer
    from clipforge.losses import clip_loss
    from clipforge.models import CLIP, CLIPConfig

    if args.sdpa:
        transformer.use_short_attention = lambda x, mask: False
    spec = model_spec(args.model, json.loads(args.overrides))
    model = CLIP(CLIPConfig.from_dict(spec)).train()
    opt = clipforge_optimizer(model)
    images, texts = make_images(spec, args.batch), make_texts(spec, args.batch, args.texts, 1)[0]

    def step():
        train_step(model, clip_loss, opt, images, texts, args.precision)

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.gemms) as prof:
        for _ in range(args.steps):
            step()
    totals: dict[str, float] = collections.defaultdict(float)
    for ev in prof.events():
        if ev.name.startswith("aten::") or ev.name.startswith("cpp_fused"):
            parent = ev.cpu_parent.name if ev.cpu_parent is not None else None
            totals[categorize(ev.name, parent)] += ev.self_cpu_time_total
    total = sum(totals.values())
    print(f"\nmodel={args.model} overrides={args.overrides} batch={args.batch} precision={args.precision} "
          f"attention={'SDPA' if args.sdpa else 'short_attention'} threads={args.threads}: "
          f"{total / 1e6 / args.steps:.3f} s of op time per step (profiled)\n")
    print("| category | share of step |")
    print("|---|---:|")
    for cat, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {cat} | {100 * t / total:.1f}% |")
    if args.table:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.gemms:
        print("\n" + "\n".join(gemm_table(*gemm_rows(prof.events()), args.steps, args.peak)))


if __name__ == "__main__":
    main()
