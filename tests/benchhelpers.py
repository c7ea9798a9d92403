"""A script of benchmarks/ loaded as a module for its tests (benchmarks/ is a folder of scripts, not a package)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(filename: str, module_name: str | None = None) -> ModuleType:
    """``benchmarks/filename`` executed as module ``module_name`` (default: the file's stem), registered in
    ``sys.modules`` so that dataclasses and pickling inside it find it."""
    name = module_name or Path(filename).stem
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_clip_training_step(batch: int = 3):
    """One forward + backward of an untrained ``tiny`` CLIP with the CLIP loss on ``batch`` random images and texts,
    as a function of no arguments: a training step for the tests of the step profilers."""
    import torch

    from clipforge.losses import clip_loss
    from clipforge.models import CLIP, CLIPConfig, get_model_config

    spec = get_model_config("tiny").to_dict()
    model = CLIP(CLIPConfig.from_dict(spec)).train()
    images = torch.randn(batch, 3, spec["vision"]["image_size"], spec["vision"]["image_size"])
    texts = torch.randint(1, 400, (batch, spec["text"]["context_length"]))
    texts[:, 7] = spec["text"]["eot_token_id"]

    def step():
        out = model(images, texts)
        clip_loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()

    return step
