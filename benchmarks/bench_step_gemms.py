"""The GEMMs of a training step, replayed alone: how much of their time in the step is their operands' layout.

    python benchmarks/bench_step_gemms.py [--model tiny] [--overrides JSON] [--batch 128] [--precision bf16]
        [--steps 4] [--threads 2] [--repeats 5] [--top 25] [--weight-gradients]

``profile_train_step.py --gemms`` showed a step's GEMMs running well below the rate ``bench_peak.py`` times for
the same shapes. Two things differ between the two: inside a step many operands are transposed views (the
gradient products of a linear layer read ``dy^T`` or ``W^T`` in place, and the attention products read strided
heads), and they run between other ops, with cold caches, on a machine whose speed drifts. This script separates
the two. It trains a few steps (after 3 of warm-up) with every ``mm``, ``addmm``, ``bmm`` and ``baddbmm``
recorded through a ``TorchDispatchMode`` (operator, operand shapes and strides, dtype, and the time of the call;
under autocast the recorded operands are the bf16 ones), then replays each distinct call alone on fresh tensors
with the same shapes and strides, and again with contiguous operands, alternating the two ``--repeats`` times
(median of 5 calls each). The table has, per distinct GEMM, its rate in the step, alone with the same strides,
and alone with contiguous operands; the last line sums the step's GEMM time three ways. The contiguous column
does not count the copies that would make the operands contiguous: it bounds what a different layout could save.
``--precision fp32`` records torch's own fp32 GEMMs, the path of ``clipforge train --fp32-linear torch``; the oneDNN
linears that ``clipforge train`` takes for fp32 where they are faster (``clipforge.models.onednn_linear``) are not
``mm`` calls and are not recorded.

``--weight-gradients`` also times the ways to compute a linear layer's weight gradient ``dW = dy^T x``
(dy: [M, N], x: [M, K]) at the shapes of the step's linear layers: ``mm(dy^T, x)`` (autograd's), ``mm(x^T, dy)^T``,
``mm`` after copying ``dy^T`` to contiguous memory (the copy counted), and oneDNN's linear kernel in both
orientations (``clipforge.models.onednn_linear``'s trick for fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from profile_train_step import gemm_flops  # noqa: E402

_aten = torch.ops.aten
GEMMS = {_aten.mm.default: "aten::mm", _aten.addmm.default: "aten::addmm", _aten.bmm.default: "aten::bmm",
         _aten.baddbmm.default: "aten::baddbmm"}


class GemmRecorder(TorchDispatchMode):
    """Records every GEMM call while ``recording`` is true: ``calls[(operator, operands)] = [calls, seconds]``
    with operands a tuple of (shape, stride, dtype) per tensor argument; ``example[key]`` keeps the op and its
    keyword arguments (``baddbmm``'s alpha and beta) for the replay."""

    def __init__(self):
        super().__init__()
        self.recording = False
        self.calls: dict[tuple, list] = {}
        self.example: dict[tuple, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not (self.recording and func in GEMMS):
            return func(*args, **kwargs)
        key = (GEMMS[func], tuple((tuple(a.shape), tuple(a.stride()), a.dtype)
                                  for a in args if isinstance(a, torch.Tensor)))
        start = time.perf_counter()
        out = func(*args, **kwargs)
        row = self.calls.setdefault(key, [0, 0.0])
        row[0] += 1
        row[1] += time.perf_counter() - start
        self.example.setdefault(key, (func, kwargs))
        return out


def strided_like(shape: tuple, stride: tuple, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A tensor of random values with exactly this shape and stride (a view of a fresh buffer just large enough)."""
    size = 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0
    return torch.randn(size, generator=generator).to(dtype).as_strided(shape, stride)


def median_call(fn, calls: int = 5) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2]


def alternating_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Seconds of one call of each function of ``fns`` (label -> function of no arguments): one warm-up call each
    (oneDNN builds its kernels on the first call of a shape), then ``repeats`` rounds that call each in turn, each
    round's time the median of 5 calls; the median over rounds."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            times[label].append(median_call(fn))
    return {label: sorted(t)[repeats // 2] for label, t in times.items()}


def replay(func, operands: tuple, kwargs: dict, repeats: int, seed: int = 0) -> tuple[float, float]:
    """Seconds of one call of ``func`` alone: (operands with the recorded strides, contiguous operands), timed
    alternately (:func:`alternating_medians`)."""
    gen = torch.Generator().manual_seed(seed)
    strided = [strided_like(*op, generator=gen) for op in operands]
    dense = [t.contiguous() for t in strided]
    got = alternating_medians({"same": lambda: func(*strided, **kwargs),
                               "contiguous": lambda: func(*dense, **kwargs)}, repeats)
    return got["same"], got["contiguous"]


def weight_gradient_products(dy: torch.Tensor, x: torch.Tensor) -> dict:
    """The ways to compute ``dy^T x`` that ``--weight-gradients`` times, each a function of no arguments."""
    linear = torch.ops.mkldnn._linear_pointwise
    return {
        "mm(dy^T, x) (autograd's)": lambda: torch.mm(dy.t(), x),
        "mm(x^T, dy)^T": lambda: torch.mm(x.t(), dy).t(),
        "contiguous dy^T, then mm": lambda: torch.mm(dy.t().contiguous(), x),
        "oneDNN linear(dy^T, x^T)": lambda: linear(dy.t(), x.t(), None, "none", [], ""),
        "oneDNN linear(x^T, dy^T)^T": lambda: linear(x.t(), dy.t(), None, "none", [], "").t(),
    }


def record_training_steps(spec: dict, batch: int, precision: str, steps: int) -> tuple[GemmRecorder, float]:
    """Train ``steps`` steps of the model ``spec`` (after 3 of warm-up) with the GEMMs recorded; returns the recorder
    and the seconds per recorded step."""
    from bench_train_throughput import clipforge_optimizer, make_images, make_texts, train_step

    from clipforge.losses import clip_loss
    from clipforge.models import CLIP, CLIPConfig

    model = CLIP(CLIPConfig.from_dict(spec)).train()
    opt = clipforge_optimizer(model)
    images, texts = make_images(spec, batch), make_texts(spec, batch, "shapes", 1)[0]
    recorder = GemmRecorder()
    with recorder:
        for _ in range(3):
            train_step(model, clip_loss, opt, images, texts, precision)
        recorder.recording = True
        start = time.perf_counter()
        for _ in range(steps):
            train_step(model, clip_loss, opt, images, texts, precision)
        per_step = (time.perf_counter() - start) / steps
    return recorder, per_step


def operand_text(operands: tuple) -> str:
    return "; ".join(f"{'x'.join(map(str, shape))} {tuple(stride)}" for shape, stride, _ in operands)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--overrides", default="{}", help="model config overrides as JSON (the width-512 config...)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=4, help="recorded steps (after 3 of warm-up)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds of the replay")
    ap.add_argument("--top", type=int, default=25, help="table rows: the GEMMs with the most time in the step")
    ap.add_argument("--weight-gradients", action="store_true",
                    help="also time the ways to compute the weight gradients of the step's linear layers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bench_train_throughput import model_spec

    from clipforge import allocator

    allocator.configure()  # what every clipforge command does first
    spec = model_spec(args.model, json.loads(args.overrides))
    recorder, per_step = record_training_steps(spec, args.batch, args.precision, args.steps)
    rows = []
    for key, (calls, seconds) in recorder.calls.items():
        name, operands = key
        flops = gemm_flops(name, [list(shape) for shape, _, _ in operands])
        func, kwargs = recorder.example[key]
        same, contiguous = replay(func, operands, kwargs, args.repeats)
        rows.append((seconds / args.steps, name, operands, calls / args.steps, flops * calls / seconds,
                     flops / same, flops / contiguous))
    rows.sort(key=lambda r: -r[0])
    print(f"\nmodel={args.model} overrides={args.overrides} batch={args.batch} precision={args.precision} "
          f"threads={args.threads}: {per_step * 1e3:.1f} ms per step while recording\n")
    print("| ms / step | operator | operands (shape stride) | calls / step | GFLOP/s in the step "
          "| alone, same strides | alone, contiguous |")
    print("|---:|---|---|---:|---:|---:|---:|")
    totals = [0.0, 0.0, 0.0]
    for i, (ms, name, operands, calls, in_step, same, contiguous) in enumerate(rows):
        totals[0] += ms
        totals[1] += ms * in_step / same
        totals[2] += ms * in_step / contiguous
        if i < args.top:
            print(f"| {ms * 1e3:.2f} | {name.removeprefix('aten::')} | {operand_text(operands)} | {calls:g} "
                  f"| {in_step / 1e9:.0f} | {same / 1e9:.0f} | {contiguous / 1e9:.0f} |")
    print(f"\nGEMM time per step: {totals[0] * 1e3:.1f} ms in the step ({100 * totals[0] / per_step:.0f}% of it); "
          f"alone with the same strides {totals[1] * 1e3:.1f} ms; alone with contiguous operands "
          f"{totals[2] * 1e3:.1f} ms (copies not counted)")

    if args.weight_gradients:
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        shapes = sorted({(ops[1][0][0], ops[2][0][1], ops[1][0][1]) for (name, ops) in recorder.calls
                         if name == "aten::addmm"}, reverse=True)  # forward linears: (M, N, K)
        gen = torch.Generator().manual_seed(0)
        print("\nWeight gradient dW = dy^T x, GFLOP/s (median of rounds, alternating):\n")
        header = None
        for m, n, k in shapes:
            dy, x = torch.randn(m, n, generator=gen).to(dtype), torch.randn(m, k, generator=gen).to(dtype)
            products = weight_gradient_products(dy, x)
            if header is None:
                header = list(products)
                print("| M x N x K | " + " | ".join(header) + " |")
                print("|---|" + "---:|" * len(header))
            seconds = alternating_medians(products, args.repeats)
            rates = [2 * m * n * k / seconds[label] / 1e9 for label in header]
            print(f"| {m}x{n}x{k} | " + " | ".join(f"{r:.0f}" for r in rates) + " |")


if __name__ == "__main__":
    main()
