"""Throughput of the image and text encoders: PyTorch eager vs onnxruntime (CPU).

    python benchmarks/bench_onnx.py --model ViT-B-32 --batch 16 --iters 5 --threads 2

Exports the (randomly initialized) model with clipforge.interop.onnx_export, checks parity
(max abs difference of normalized embeddings) and reports images/s and texts/s for both
runtimes with the same number of threads. Weights do not change the speed, so random ones
stand in for a pretrained checkpoint of the same shape.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch

import clipforge
from clipforge.interop.onnx_export import OnnxCLIP, export_onnx


def rate(fn, x, iters: int) -> float:
    fn(x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return iters * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = clipforge.create_model(a.model, seed=0).eval()
    size, ctx = model.image_size, model.context_length
    pixels = torch.randn(a.batch, 3, size, size)
    texts = [f"a photo of {i} red circles next to a blue square" for i in range(a.batch)]
    ids = clipforge.tokenize(texts, context_length=ctx)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, d)
        onnx_model = OnnxCLIP(d, threads=a.threads)
        with torch.inference_mode():
            diff_i = (onnx_model.encode_image(pixels) - model.encode_image(pixels)).abs().max().item()
            diff_t = (onnx_model.encode_text(ids) - model.encode_text(ids)).abs().max().item()
            rows = [
                ("PyTorch", rate(model.encode_image, pixels, a.iters), rate(model.encode_text, ids, a.iters)),
                (
                    "onnxruntime",
                    rate(onnx_model.encode_image, pixels, a.iters),
                    rate(onnx_model.encode_text, ids, a.iters),
                ),
            ]
    print(f"model {a.model}, batch {a.batch}, {a.iters} iters, {a.threads} threads; "
          f"parity max|diff| image {diff_i:.2e}, text {diff_t:.2e}")
    print("| runtime | images/s | texts/s |\n|---|---|---|")
    for name, ips, tps in rows:
        print(f"| {name} | {ips:.1f} | {tps:.1f} |")


if __name__ == "__main__":
    main()
