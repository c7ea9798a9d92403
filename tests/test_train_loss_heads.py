"""Loss terms with their own trainable heads (BYOL's predictors, SwAV's prototypes) under ``clipforge.train``:
the optimizer updates them, the checkpoint keeps them, and a resumed run reproduces the uninterrupted losses."""
import dataclasses

import pytest
import torch

from clipforge import losses
from clipforge.train import train
from clipforge.train.checkpoint import load_state, resolve_checkpoint


def test_heads_train_are_checkpointed_and_resume_exactly(tiny_cfg, tmp_path):
    torch.set_num_threads(1)
    cfg = dataclasses.replace(tiny_cfg, steps=4, save_every=0, data=dataclasses.replace(tiny_cfg.data, train_size=64),
                              batch_size=16, loss={"clip": 1.0, "byol": {"weight": 1.0, "embed_dim": 32, "hidden_dim": 8},
                                                   "swav": {"weight": 0.2, "embed_dim": 32, "num_prototypes": 6}})
    full = train(cfg)
    state = load_state(resolve_checkpoint(cfg.out_dir, "latest"))
    heads = state["loss_terms"]
    fresh = losses.build_composite(cfg.loss).state_dict()
    assert set(heads) == set(fresh) and any(k.startswith("terms.byol.") for k in heads)
    for key in fresh:  # every head moved away from its initialization
        assert not torch.allclose(heads[key], fresh[key]), key
    split = dataclasses.replace(cfg, out_dir=str(tmp_path / "split"))
    first = train(dataclasses.replace(split, stop_at=2))
    resumed = train(dataclasses.replace(split, resume="latest"))
    assert first.losses + resumed.losses == pytest.approx(full.losses, abs=1e-6)
