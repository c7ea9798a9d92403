"""Peak extra memory and time of the chunked CLIP/SigLIP losses, and their agreement with the dense ones.

Each case (loss, batch, dense or chunked) runs forward + backward in a fresh subprocess. The
reported memory is the growth of the process's peak resident set (``ru_maxrss``) over its value
once the inputs exist (features, their gradient buffers, scale and bias) and the kernels are
loaded: what the loss itself needs on top of the features. Wherever the dense loss is run
(B <= --dense-batch), the chunked case is compared with it on the value and on the full
gradients of the features, the scale and the bias (max absolute difference).

    python benchmarks/bench_loss_memory.py [--batch 32768] [--dim 512] [--chunk 1024] [--dense-batch 8192]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def case(kind: str, mode: str, batch: int, dim: int, chunk: int, threads: int, save: str) -> dict:
    import torch

    from clipforge.losses import clip_loss, siglip_loss

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    t, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    x.grad, y.grad = torch.zeros_like(x), torch.zeros_like(y)  # gradient buffers count as inputs
    small = torch.randn(8, dim)
    clip_loss(small, small, 1.0, chunk_size=4), siglip_loss(small, small, 1.0, 0.0, chunk_size=4)  # load kernels
    clip_loss(small, small, 1.0), siglip_loss(small, small, 1.0, 0.0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    c = chunk if mode == "chunked" else None
    loss = clip_loss(x, y, t, chunk_size=c) if kind == "clip" else siglip_loss(x, y, t, b, chunk_size=c)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save({"loss": loss.detach(), "x": x.grad, "y": y.grad, "t": t.grad, "b": b.grad}, save)
    return {"loss": float(loss), "extra_gib": (peak - base) / 2**20, "seconds": seconds}


def run(kind, mode, batch, dim, chunk, threads, save):
    argv = [sys.executable, __file__, "--_case", kind, mode, str(batch), str(dim), str(chunk), str(threads), save]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def max_diffs(a: str, b: str) -> str:
    import torch

    ra, rb = torch.load(a), torch.load(b)
    value = float((ra["loss"] - rb["loss"]).abs())
    grads = max(float((ra[k] - rb[k]).abs().max()) for k in ("x", "y", "t") if ra[k] is not None)
    bias = "" if ra["b"] is None else f", bias {float((ra['b'] - rb['b']).abs()):.1e}"
    return f"{value:.1e}, {grads:.1e}{bias}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32768)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--dense-batch", type=int, default=8192, help="largest batch at which the dense loss is also run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--_case", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._case:
        kind, mode, batch, dim, chunk, threads, save = args._case
        print(json.dumps(case(kind, mode, int(batch), int(dim), int(chunk), int(threads), save)))
        return
    print(f"d={args.dim}, chunk={args.chunk}, fp32, forward+backward, {args.threads} threads; "
          "extra = peak RSS growth over the inputs\n")
    print("| loss | B | mode | extra peak memory | seconds | loss value | max abs diff vs dense (loss, grads) |")
    print("|---|---:|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("clip", "siglip"):
            for batch in sorted({args.dense_batch, args.batch}):
                modes = ("dense", "chunked") if batch <= args.dense_batch else ("chunked",)
                results = {m: run(kind, m, batch, args.dim, args.chunk, args.threads, str(Path(tmp) / f"{m}.pt"))
                           for m in modes}
                for mode, r in results.items():
                    if "error" in r:
                        print(f"| {kind} | {batch} | {mode} | failed: {r['error']} | | | |")
                        continue
                    diff = ""
                    if mode == "chunked" and "error" not in results.get("dense", {"error": 1}):
                        diff = max_diffs(str(Path(tmp) / "chunked.pt"), str(Path(tmp) / "dense.pt"))
                    print(f"| {kind} | {batch} | {mode} | {r['extra_gib']:.2f} GiB | {r['seconds']:.1f} | "
                          f"{r['loss']:.5f} | {diff} |", flush=True)


if __name__ == "__main__":
    main()
