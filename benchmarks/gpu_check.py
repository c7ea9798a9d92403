"""One command for a CUDA machine: how fast does clipforge train ViT-B-32, and how does OpenCLIP compare?

    PYTHONPATH=src python benchmarks/gpu_check.py                 # ViT-B-32, 224 px, bf16, batch 256, 300 steps
    PYTHONPATH=src python benchmarks/gpu_check.py --steps 100 --batch 128 --json
    PYTHONPATH=src python benchmarks/gpu_check.py --dry-run       # tiny model on the CPU: the script itself works

Nothing is downloaded and nothing outside PyTorch (and clipforge from the source tree) is imported, except
``open_clip`` when it is importable: then OpenCLIP's ViT-B-32 trains in the same process, on the same GPU, with
the same batch, synthetic data, AdamW and symmetric CLIP loss, for the same number of steps.

Per library it prints samples/s (median step after ``--warmup`` steps), model TFLOP/s achieved (FLOPs per sample
counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward of clipforge's model: GEMMs,
patch projection and attention matmuls; the same architecture, so the same count is used for OpenCLIP), MFU
against the device's dense bf16 peak (``PEAK_BF16_TFLOPS`` by device name, else a bf16 GEMM measured here, which
``--peak measure`` forces), and peak GPU memory (``torch.cuda.max_memory_allocated``).

Data are random pixels and random token ids (no decoding, no tokenizer): this measures the training step, not
the input pipeline. The towers train under bf16 autocast with fp32 weights (clipforge's precision=bf16), TF32
allowed, fused AdamW.

The session that wrote this script had no GPU: only ``--dry-run`` was run (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("A6000", 154.8), ("A40", 149.7), ("A30", 165.0),
    ("A10G", 70.0), ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("4090", 165.2),
    ("3090", 71.0),
]


def known_peak(name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def measured_peak(device, size: int = 8192, reps: int = 20) -> float:
    """Achieved bf16 GEMM FLOP/s of a square matmul on ``device`` (best of ``reps``)."""
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic(batch: int, image_size: int, context: int, vocab: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    texts = torch.randint(1, vocab - 2, (batch, context), generator=g)
    texts[:, 0], texts[:, -1] = vocab - 2, vocab - 1  # start and end tokens (the end token has the largest id)
    return images.to(device), texts.to(device)


def flops_per_sample(model, images, texts, loss_fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss_fn(model(images, texts)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / images.shape[0]


def time_training(model, loss_fn, images, texts, steps: int, warmup: int, device) -> list[float]:
    """Seconds of each step after ``warmup`` steps (bf16 autocast, fused AdamW where the device has it)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            out = model(images, texts)
        loss_fn(out).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def clip_objective(out) -> torch.Tensor:  # noqa: F821
    import torch
    import torch.nn.functional as F

    img, txt = out["image_features"].float(), out["text_features"].float()
    logits = out["logit_scale"].float() * img @ txt.t()
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def run(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from clipforge.models import create_model

    if args.dry_run:
        device = torch.device("cpu")
        overrides = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                  "heads": 2},
                     "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}}
        name, batch, steps, warmup = "tiny", 8, 3, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); run it on a GPU "
                             "machine, or pass --dry-run to check the script on the CPU")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        overrides = {"vision": {"image_size": args.image_size}}
        name, batch, steps, warmup = args.model, args.batch, args.steps, args.warmup
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = known_peak(device_name) if args.peak == "table" and device.type == "cuda" else None
    peak_source = "data sheet" if peak else "measured bf16 GEMM"
    if peak is None:
        peak = measured_peak(device, size=512 if args.dry_run else 8192, reps=3 if args.dry_run else 20)

    model = create_model(name, seed=0, **overrides).to(device).train()
    image_size, context = model.image_size, model.context_length
    images, texts = synthetic(batch, image_size, context, model.cfg.text.vocab_size, device)
    fps = flops_per_sample(model, images[: min(batch, 8)], texts[: min(batch, 8)], clip_objective)
    report = {"device": device_name, "model": name, "image_size": image_size, "batch": batch, "steps": steps,
              "precision": "bf16", "gflop_per_sample": fps / 1e9, "peak_tflops": peak / 1e12,
              "peak_source": peak_source, "results": {}}

    def measure(label, m, objective):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = time_training(m, objective, images, texts, steps, warmup, device)
        sps = batch / statistics.median(times)
        report["results"][label] = {
            "samples_per_second": sps, "tflops": sps * fps / 1e12, "mfu": sps * fps / peak,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "step_seconds_median": statistics.median(times)}

    measure("clipforge", model, clip_objective)
    del model
    try:
        import open_clip
    except ImportError:
        report["openclip"] = "not importable: OpenCLIP not measured"
    else:
        if args.dry_run:
            report["openclip"] = "dry run: OpenCLIP is measured only on a GPU run"
        else:
            oc = open_clip.create_model(args.model, pretrained=None).to(device).train()
            measure_openclip(report, oc, images, texts, steps, warmup, device, batch, fps, peak)
    if "openclip" in report["results"]:
        report["speedup_vs_openclip"] = (report["results"]["clipforge"]["samples_per_second"]
                                         / report["results"]["openclip"]["samples_per_second"])
    return report


def measure_openclip(report, oc, images, texts, steps, warmup, device, batch, fps, peak) -> None:
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, i, t):
            out = self.inner(i, t)
            if isinstance(out, dict):
                return out
            return {"image_features": out[0], "text_features": out[1], "logit_scale": out[2]}

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    times = time_training(Wrapped(oc), clip_objective, images, texts, steps, warmup, device)
    sps = batch / statistics.median(times)
    report["results"]["openclip"] = {"samples_per_second": sps, "tflops": sps * fps / 1e12, "mfu": sps * fps / peak,
                                     "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                                     "step_seconds_median": statistics.median(times)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="clipforge model config (and OpenCLIP model name)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=300, help="timed steps per library (default 300)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (default 20)")
    p.add_argument("--peak", choices=["table", "measure"], default="table",
                   help="MFU against the data-sheet bf16 peak of a known device (default) or a measured bf16 GEMM")
    p.add_argument("--dry-run", action="store_true", help="a tiny model for 3 steps on the CPU: checks the script")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['device']}: {report['model']} at {report['image_size']} px, batch {report['batch']}, bf16, "
          f"{report['steps']} timed steps; {report['gflop_per_sample']:.4g} GFLOP per sample (fwd+bwd); "
          f"peak {report['peak_tflops']:.4g} TFLOP/s ({report['peak_source']})")
    print("| library | samples/s | TFLOP/s | MFU | peak memory GiB |")
    print("|---|---:|---:|---:|---:|")
    for label, r in report["results"].items():
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        print(f"| {label} | {r['samples_per_second']:.1f} | {r['tflops']:.4g} | {r['mfu']:.1%} | {mem} |")
    if "speedup_vs_openclip" in report:
        print(f"clipforge / OpenCLIP samples/s: {report['speedup_vs_openclip']:.2f}x")
    else:
        print(f"OpenCLIP: {report.get('openclip', 'not measured')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
