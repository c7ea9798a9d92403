"""benchmarks/bench_train_throughput.py: its training step and one short run of the script."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from benchhelpers import load_benchmark

from clipforge.losses import clip_loss
from clipforge.models import CLIP, CLIPConfig, get_model_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_throughput.py"


def test_train_step_takes_clipforge_dicts_and_tuples_alike():
    """One step through clipforge's output dict and one through a (image, text, scale) tuple, from the same
    initialization, leave the same weights; the gradients are cleared afterwards."""
    btt = load_benchmark("bench_train_throughput.py")
    spec = get_model_config("tiny").to_dict()
    images = torch.randn(4, 3, spec["vision"]["image_size"], spec["vision"]["image_size"])
    texts = torch.randint(1, 400, (4, spec["text"]["context_length"]))
    texts[:, 5] = spec["text"]["eot_token_id"]

    class AsTuple(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, images, texts):
            out = self.m(images, texts)
            return out["image_features"], out["text_features"], out["logit_scale"]

    models = []
    for wrap in (lambda m: m, AsTuple):
        torch.manual_seed(0)
        model = CLIP(CLIPConfig.from_dict(spec)).train()
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        btt.train_step(wrap(model), clip_loss, opt, images, texts, "fp32")
        assert all(p.grad is None for p in model.parameters())
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_short_clipforge_only_run_prints_its_table():
    res = subprocess.run([sys.executable, str(SCRIPT), "--no-openclip", "--batch", "4", "--steps", "2", "--repeats",
                          "1", "--threads", "1", "--precision", "fp32"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "clipforge" in res.stdout and "samples/s" in res.stdout, res.stdout
