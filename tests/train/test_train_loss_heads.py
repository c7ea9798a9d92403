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
    loss = {"clip": 1.0, "byol": {"weight": 1.0, "embed_dim": 32, "hidden_dim": 8},
            "swav": {"weight": 0.2, "embed_dim": 32, "num_prototypes": 6}}
    cfg = dataclasses.replace(tiny_cfg, steps=4, save_every=0, data=dataclasses.replace(tiny_cfg.data, train_size=64),
                              batch_size=16, loss=loss)
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


def test_two_processes_train_the_heads_like_one(tiny_cfg, tmp_path):
    """distributed.nproc=2 with the global batch split: the heads in the final checkpoint match a one-process
    run (gradients averaged over ranks; tolerance as in tests/train/test_train_distributed.py)."""
    from clipforge.train import DistributedConfig

    loss = {"clip": 1.0, "byol": {"weight": 1.0, "embed_dim": 32, "hidden_dim": 8},
            "swav": {"weight": 0.2, "embed_dim": 32, "num_prototypes": 6}}
    cfg = dataclasses.replace(tiny_cfg, steps=2, save_every=0, loss=loss, out_dir=str(tmp_path / "one"))
    train(cfg)
    train(dataclasses.replace(cfg, out_dir=str(tmp_path / "two"), distributed=DistributedConfig(nproc=2)))
    one = load_state(resolve_checkpoint(tmp_path / "one", "latest"))["loss_terms"]
    two = load_state(resolve_checkpoint(tmp_path / "two", "latest"))["loss_terms"]
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_accumulation_gives_the_heads_the_full_batch_gradient(tiny_cfg, tmp_path):
    """accum_steps=2 recomputes the full-batch loss per micro-batch; the heads end where accum_steps=1 puts them."""
    loss = {"clip": 1.0, "byol": {"weight": 1.0, "embed_dim": 32, "hidden_dim": 8},
            "swav": {"weight": 0.2, "embed_dim": 32, "num_prototypes": 6}}
    cfg = dataclasses.replace(tiny_cfg, steps=2, save_every=0, loss=loss, out_dir=str(tmp_path / "one"))
    train(cfg)
    train(dataclasses.replace(cfg, out_dir=str(tmp_path / "acc"), accum_steps=2))
    one = load_state(resolve_checkpoint(tmp_path / "one", "latest"))["loss_terms"]
    acc = load_state(resolve_checkpoint(tmp_path / "acc", "latest"))["loss_terms"]
    for key in one:
        torch.testing.assert_close(acc[key], one[key], rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
