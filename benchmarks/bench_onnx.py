"""Throughput of the image and text encoders: PyTorch vs onnxruntime fp32 vs onnxruntime int8, and the
zero-shot accuracy that int8 costs.

    python benchmarks/bench_onnx.py --model ViT-B-32 --batch 16 --iters 5 --threads 2
    python benchmarks/bench_onnx.py --model RUN_DIR --batch 64 --repeats 3 --threads 1 --eval-size 500

``--model``: a registered architecture (random weights: speed does not depend on them) or anything
``clipforge.load`` reads (a trained run). The model is exported with
``clipforge.interop.onnx_export.export_onnx`` twice, in float32 and with ``quantize="int8"``
(onnxruntime dynamic quantization), parity against PyTorch is printed (max |difference| and the
smallest cosine of the normalized embeddings), and images/s and texts/s are measured for
PyTorch fp32 (eager, ``no_grad``), PyTorch bf16 (``CLIP.to_inference("bf16")``), onnxruntime
fp32 and onnxruntime int8, with the same number of threads, in ``--repeats`` rounds that
alternate the runtimes (median and min..max over rounds). Texts are the benchmark captions of
bench_inference.py, padded to the context length (the exported text graph takes the full
padded sequence).

``--eval-size N`` (a trained ``shapes`` model) also runs clipforge's shapes evaluation
(``evaluate_shapes``: zero-shot on the held-out compositional split and retrieval on val, N
samples each) with PyTorch, onnxruntime fp32 and onnxruntime int8 as the encoder, and prints
the accuracy of each and the change int8 makes.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import clipforge
from clipforge.interop.onnx_export import OnnxCLIP, export_onnx


def rate(fn, x, iters: int) -> float:
    fn(x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    return iters * x.shape[0] / (time.perf_counter() - t0)


class OnnxAsModel(torch.nn.Module):
    """An onnxruntime encoder pair where clipforge's evaluation expects a model."""

    def __init__(self, onnx_model: OnnxCLIP, like):
        super().__init__()
        self.onnx, self.cfg, self.image_size, self.context_length = onnx_model, like.cfg, like.image_size, \
            like.context_length

    def encode_image(self, pixels):
        return self.onnx.encode_image(pixels)

    def encode_text(self, ids):
        return self.onnx.encode_text(ids)


def load_model(source: str):
    if Path(source).exists():
        model, tokenizer, _ = clipforge.load(source)
        return model.eval(), tokenizer
    model = clipforge.create_model(source, seed=0).eval()
    return model, clipforge.get_tokenizer(model.context_length)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=5, help="timed calls per runtime and round")
    p.add_argument("--repeats", type=int, default=1, help="rounds, alternating the runtimes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-size", type=int, default=0, help="run the shapes evaluation on N samples per split")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sys_path = Path(__file__).resolve().parent
    import sys

    sys.path.insert(0, str(sys_path))
    from bench_inference import captions

    model, tokenizer = load_model(a.model)
    size, ctx = model.image_size, model.context_length
    pixels = torch.randn(a.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = clipforge.tokenize(captions(a.batch), context_length=ctx)
    bf16 = load_model(a.model)[0].to_inference("bf16")
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, Path(d) / "fp32")
        export_onnx(model, Path(d) / "int8", quantize="int8")
        mb = {k: sum(f.stat().st_size for f in (Path(d) / k).glob("*.onnx")) / 2**20 for k in ("fp32", "int8")}
        runtimes = {"PyTorch fp32": model, "PyTorch bf16 (to_inference)": bf16,
                    "onnxruntime fp32": OnnxCLIP(Path(d) / "fp32", threads=a.threads),
                    "onnxruntime int8": OnnxCLIP(Path(d) / "int8", threads=a.threads)}
        print(f"model {a.model}, batch {a.batch}, {a.iters} calls x {a.repeats} rounds, {a.threads} threads; "
              f"ONNX files fp32 {mb['fp32']:.1f} MiB, int8 {mb['int8']:.1f} MiB", flush=True)
        with torch.inference_mode():
            ref_i, ref_t = model.encode_image(pixels), model.encode_text(ids)
            for name, rt in runtimes.items():
                if name == "PyTorch fp32":
                    continue
                out_i, out_t = rt.encode_image(pixels).float(), rt.encode_text(ids).float()
                print(f"parity {name} vs PyTorch fp32: max|diff| image {(out_i - ref_i).abs().max():.2e} "
                      f"text {(out_t - ref_t).abs().max():.2e}; min cosine image "
                      f"{torch.nn.functional.cosine_similarity(out_i, ref_i).min():.5f} text "
                      f"{torch.nn.functional.cosine_similarity(out_t, ref_t).min():.5f}", flush=True)
            rates = {name: {"image": [], "text": []} for name in runtimes}
            for r in range(a.repeats):
                names = list(runtimes)
                names = names[r % len(names):] + names[: r % len(names)]
                for name in names:
                    rt = runtimes[name]
                    rates[name]["image"].append(rate(rt.encode_image, pixels, a.iters))
                    rates[name]["text"].append(rate(rt.encode_text, ids, a.iters))
        print("| runtime | images/s median (min..max) | texts/s median (min..max) |\n|---|---:|---:|")
        for name, rr in rates.items():
            cells = [f"{statistics.median(v):.1f} ({min(v):.1f}..{max(v):.1f})" for v in (rr["image"], rr["text"])]
            print(f"| {name} | " + " | ".join(cells) + " |")
        if a.eval_size:
            from clipforge.evaluation.shapes_eval import evaluate_shapes

            print("\n| encoder | zero-shot top1: object (color+shape) | shape | color | count "
                  "| retrieval val i2t R@1 | t2i R@1 |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for name in ("PyTorch fp32", "onnxruntime fp32", "onnxruntime int8"):
                rt = runtimes[name]
                enc = rt if name.startswith("PyTorch") else OnnxAsModel(rt, model)
                with torch.inference_mode():
                    res = evaluate_shapes(enc, tokenizer, size=a.eval_size)
                zs, ret = res["zero_shot"], res["retrieval"]["val"]
                cells = [zs[k]["top1"] for k in ("object", "shape", "color", "count")] + [ret["i2t_R@1"],
                                                                                         ret["t2i_R@1"]]
                print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
