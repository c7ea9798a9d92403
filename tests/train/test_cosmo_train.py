"""Training COSMO with clipforge train: contrastive + generation losses (clipforge/models/cosmo.py)."""
import dataclasses

import pytest
import torch

from clipforge.train import DataConfig, train
from tests.reference.tiny_lm import make_tiny_lm

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm3"), layers=3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_cosmo_with_both_losses_opens_the_gates(lm_dir, tiny_cfg, precision):
    over = {"embed_dim": 16, "vision": VISION,
            "cosmo": {"path": str(lm_dir), "layers": None, "split": 1, "heads": 4, "n_latents": 4,
                      "context_length": 16}}
    cfg = dataclasses.replace(tiny_cfg, model="cosmo-tiny", model_overrides=over, steps=4, batch_size=6,
                              save_every=0, lr=1e-2, warmup_steps=1, precision=precision,
                              loss={"clip": 1.0, "cosmo_generation": 1.0},
                              data=DataConfig(train_size=24, eval_size=8))
    result = train(cfg)
    assert len(result.losses) == 4 and all(map(torch.isfinite, torch.tensor(result.losses)))
    gates = [float(b.attn_gate.detach()) for b in result.model.cross.values()]
    assert all(g != 0.0 for g in gates)  # the generation loss reached the gated cross-attention
