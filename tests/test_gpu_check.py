"""benchmarks/gpu_check.py (issue 12): its CPU dry run works end to end here (no GPU in this session), and the FLOP
count behind its TFLOP/s and MFU matches the analytic count of the dry run's model."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _analytic_flops_per_sample(width=32, mlp=128, patches=16, patch_dim=3 * 8 * 8, context=16, embed=32) -> float:
    """Forward multiply-accumulates of the dry run's model (1 layer per tower), times 2 for FLOPs; backward of every
    matmul costs twice its forward (input and weight gradients) except the patch projection, whose input (the
    pixels) needs no gradient."""
    def tower(tokens):
        per_token = 3 * width * width + width * width + 2 * width * mlp  # qkv, out, MLP
        attention = 2 * tokens * width  # q k^T and attention @ v
        return tokens * (per_token + attention) + width * embed  # + the projection of the pooled token

    patch = patches * patch_dim * width
    forward = tower(patches + 1) + patch + tower(context)
    return 2 * (3 * forward - patch)


def test_dry_run_reports_consistent_numbers(capsys):
    gpu_check = _module()
    assert gpu_check.main(["--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "| clipforge |" in text and "GFLOP per sample" in text
    report = gpu_check.run(gpu_check.argparse.Namespace(dry_run=True, peak="table", model="ViT-B-32", image_size=224,
                                                        batch=256, steps=300, warmup=20))
    r = report["results"]["clipforge"]
    assert r["samples_per_second"] > 0 and report["peak_tflops"] > 0
    assert r["tflops"] == pytest.approx(r["samples_per_second"] * report["gflop_per_sample"] / 1e3)
    assert r["mfu"] == pytest.approx(r["tflops"] / report["peak_tflops"])
    # the loss's logits (8 x 8 x 32 per batch) are the only matmuls outside the towers: within 2%
    assert report["gflop_per_sample"] * 1e9 == pytest.approx(_analytic_flops_per_sample(), rel=0.02)


def test_known_peaks_by_device_name():
    gpu_check = _module()
    assert gpu_check.known_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.known_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.known_peak("NVIDIA A100-SXM4-40GB") == 312e12
    assert gpu_check.known_peak("NVIDIA A10G") == 70e12 and gpu_check.known_peak("NVIDIA A10") == 125e12
    assert gpu_check.known_peak("NVIDIA L40S") == 362e12 and gpu_check.known_peak("NVIDIA L4") == 121e12
    assert gpu_check.known_peak("Some Future GPU") is None  # then the script measures a bf16 GEMM
