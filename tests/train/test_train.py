import json
import math
from pathlib import Path

import pytest
import torch

from clipforge.train import TrainingDiverged, load_config, train
from clipforge.train.checkpoint import list_checkpoints
from clipforge.train.data import ResumableBatchSampler
from clipforge.train.optim import cosine_with_warmup


def test_loss_decreases_on_shapes(tiny_cfg):
    tiny_cfg.steps = 40
    tiny_cfg.save_every = 0
    result = train(tiny_cfg)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert result.samples_seen == 40 * 32


def test_resume_reproduces_uninterrupted_losses(tiny_cfg, tmp_path):
    import dataclasses

    tiny_cfg.steps = 8
    full = train(tiny_cfg)
    split = dataclasses.replace(tiny_cfg, out_dir=str(tmp_path / "split"))
    first = train(dataclasses.replace(split, stop_at=3))  # interrupted mid-schedule, off the save cadence
    assert first.step == 3
    resumed = train(dataclasses.replace(split, resume="latest"))
    assert resumed.step == 8
    assert first.losses + resumed.losses == pytest.approx(full.losses, abs=1e-6)
    # the resumed weights equal the uninterrupted ones
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_accumulation_matches_full_batch_gradient(tiny_cfg, monkeypatch):
    """The first step's gradient (before clipping and AdamW, which hide a wrong scale) is the full-batch one."""
    import dataclasses

    from test_train_extras import first_step_gradients

    cfg = dataclasses.replace(tiny_cfg, steps=2, save_every=0)
    a, g_full = first_step_gradients(cfg, monkeypatch)
    b, g_acc = first_step_gradients(dataclasses.replace(cfg, accum_steps=4, out_dir=cfg.out_dir + "_acc"), monkeypatch)
    names = [n for n, p in a.model.named_parameters() if p.requires_grad]
    assert len(g_full) == len(g_acc) == len(names) and "logit_scale" in names
    for name, x, y in zip(names, g_full, g_acc):
        assert x.abs().max() > 0, name  # every parameter gets a gradient, so the comparison means something
        assert (x - y).abs().max() <= 1e-5 * x.abs().max(), name
    # exact full-batch loss with cached features: the same first loss up to float error
    assert b.losses[0] == pytest.approx(a.losses[0], abs=1e-6)


def test_checkpoints_metrics_and_pruning(tiny_cfg):
    train(tiny_cfg)
    ckpts = list_checkpoints(tiny_cfg.out_dir)
    assert [c.name for c in ckpts] == ["step_0000008", "step_0000012"]
    for c in ckpts:
        assert (c / "model.safetensors").exists() and (c / "state.pt").exists() and (c / "model_config.json").exists()
    lines = [json.loads(l) for l in open(f"{tiny_cfg.out_dir}/metrics.jsonl")]
    steps = [l["step"] for l in lines if "loss" in l]
    assert steps == list(range(1, 13))
    assert all(math.isfinite(l["loss"]) and l["samples_per_second"] > 0 for l in lines if "loss" in l)


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tiny_cfg, monkeypatch):
    import clipforge.train.loop as loop

    original = loop._loss_inputs
    calls = {"n": 0}

    def poisoned(out, batch, extra=None):
        calls["n"] += 1
        inputs = original(out, batch, extra)
        if calls["n"] == 6:
            inputs.image_features = inputs.image_features * float("nan")
        return inputs

    monkeypatch.setattr(loop, "_loss_inputs", poisoned)
    with pytest.raises(
        TrainingDiverged, match=r"loss became nan at step 5; the last good checkpoint is .*step_0000004"
    ):
        train(tiny_cfg)
    ckpts = list_checkpoints(tiny_cfg.out_dir)
    assert ckpts and ckpts[-1].name == "step_0000004"


def test_corrupt_images_are_skipped_and_counted(tiny_cfg, monkeypatch, tmp_path):
    from clipforge.data import DATASETS

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    from clipforge.data.datasets import ShapesDataset

    class Broken(ShapesDataset):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            if i % 8 == 0:
                item = dict(item, image=str(bad))
            return item

    DATASETS.register("broken-shapes-test", lambda **kw: Broken(**kw), overwrite=True)
    import dataclasses

    cfg = dataclasses.replace(
        tiny_cfg, data=dataclasses.replace(tiny_cfg.data, dataset="broken-shapes-test"), save_every=0
    )
    result = train(cfg)
    assert result.step == cfg.steps
    expected = sum(1 for b in ResumableBatchSampler(256, 32, cfg.seed, 0, cfg.steps) for _, i in b if i % 8 == 0)
    assert result.skipped == expected > 0
    assert result.samples_seen == cfg.steps * 32 - expected


def test_sampler_resume_position():
    full = list(ResumableBatchSampler(100, 16, seed=0, start_batch=0, num_batches=20))
    tail = list(ResumableBatchSampler(100, 16, seed=0, start_batch=13, num_batches=7))
    assert full[13:] == tail
    # epochs are permutations without repetition (drop-last: 6 batches of 16 from 100)
    epoch0 = [i for b in full[:6] for _, i in b]
    assert len(set(epoch0)) == 96


def test_schedule_shape():
    assert cosine_with_warmup(0, 10, 100) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 10, 100) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 10, 100) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 10, 100) == pytest.approx(0.0)


def test_no_weight_decay_groups():
    from clipforge.models import create_model
    from clipforge.train.optim import build_optimizer

    model = create_model("tiny")
    opt = build_optimizer(model, 1e-3, 0.2, (0.9, 0.98), 1e-6)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "logit_scale" not in names and "text.token_embedding.weight" not in names
    assert not any(n.endswith(".bias") or "ln_" in n for n in names)
    assert "visual.transformer.blocks.0.attn.in_proj.weight" in names


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 7\nlr: 0.01\ndata:\n  train_size: 1000\n")
    cfg = load_config(f, ["lr=0.5", "loss={siglip: 1.0}"])
    assert cfg.steps == 7 and cfg.lr == 0.5 and cfg.data.train_size == 1000 and cfg.loss == {"siglip": 1.0}
    with pytest.raises(ValueError, match="bogus"):
        load_config(None, ["bogus=1"])
    with pytest.raises(ValueError, match="steps"):
        load_config(None, ["steps=abc"])
    with pytest.raises(ValueError, match="precision"):
        load_config(None, ["precision=fp8"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_bf16_training_runs(tiny_cfg):
    import dataclasses

    result = train(dataclasses.replace(tiny_cfg, precision="bf16", steps=4, save_every=0))
    assert all(math.isfinite(l) for l in result.losses)


def test_siglip_training_needs_bias(tiny_cfg):
    import dataclasses

    with pytest.raises(ValueError, match="init_logit_bias"):
        train(dataclasses.replace(tiny_cfg, loss={"siglip": 1.0}))
    ok = dataclasses.replace(tiny_cfg, loss={"siglip": 1.0}, steps=3, save_every=0,
                             model_overrides={**tiny_cfg.model_overrides, "init_logit_bias": -10.0})
    assert all(math.isfinite(l) for l in train(ok).losses)


def test_hard_negative_and_counting_terms_get_their_captions(tiny_cfg):
    """The loop delivers per-sample negative captions only when a configured term reads them."""
    from clipforge.data import build_dataset
    from clipforge.tokenizer import get_tokenizer
    from clipforge.train.data import TrainItems, make_collate

    ds = build_dataset("shapes", split="train", size=64, seed=0, image_size=32)
    items = TrainItems(ds, seed=0, image_size=32, negatives=2, count_negatives=True)
    batch = make_collate(get_tokenizer(16))([items[(0, i)] for i in range(16)])
    assert batch["negative_texts"].shape == (16, 2, 16) and batch["negative_mask"].shape == (16, 2)
    for i in range(16):
        typed = ds[i]["negatives"]
        pool = {c for v in typed.values() for c in v}
        got = items[(0, i)]["negatives"]
        assert set(got) <= pool and len(got) == min(2, len(pool))  # drawn from the sample's own negatives
        assert (items[(0, i)]["count_negative"] is not None) == bool(typed.get("count"))
    assert batch["count_mask"].any() and not batch["count_mask"].all()
    plain = make_collate(get_tokenizer(16))([TrainItems(ds, 0, 32)[(0, i)] for i in range(4)])
    assert "negative_texts" not in plain

    tiny_cfg.loss = {"clip": 1.0, "hard_negative": 1.0, "counting": 0.5}
    tiny_cfg.steps = 3
    result = train(tiny_cfg)
    records = [json.loads(l) for l in open(Path(tiny_cfg.out_dir) / "metrics.jsonl") if '"hard_negative"' in l]
    assert len(records) == 3 and all(r["counting"] >= 0 for r in records)
    assert all(math.isfinite(l) for l in result.losses)
    # gradient accumulation with per-sample extra captions: the exact full-batch loss
    # (tests/train/test_train_extras.py checks it against accum_steps=1)
    tiny_cfg.accum_steps, tiny_cfg.out_dir = 2, tiny_cfg.out_dir + "_acc"
    assert train(tiny_cfg).losses == pytest.approx(result.losses, abs=1e-4)
