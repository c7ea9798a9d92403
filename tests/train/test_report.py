"""report_to (issue 12): the numbers of metrics.jsonl also go to TensorBoard event files beside it (read back here
with TensorBoard's own EventAccumulator and compared with metrics.jsonl, the reference) and to wandb in offline mode
(skipped where wandb is not installed); a missing package or unknown reporter is a one-line error at start-up."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from clipforge.errors import ConfigError
from clipforge.train import train
from clipforge.train.report import check_reporters, scalars


def _fake_eval(model, tokenizer):
    return {"zero_shot": {"shape": 0.25}, "retrieval_r1": 0.5}


def test_scalars_of_a_record():
    record = {"step": 3, "loss": 1.5, "clip": 1.5, "lr": 1e-3, "skipped": 0, "eval": {"a": {"b": 0.5}, "c": 2},
              "resume": {"checkpoint": "x"}, "bad": float("nan"), "flag": True}
    assert scalars(record) == {"train/loss": 1.5, "train/clip": 1.5, "train/lr": 1e-3, "train/skipped": 0.0,
                               "eval/a/b": 0.5, "eval/c": 2.0}


def test_unknown_or_missing_reporters_are_named():
    with pytest.raises(ConfigError, match="unknown \\['mlflow'\\]"):
        check_reporters(["mlflow"])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="pip install wandb"):
            check_reporters(["wandb"])


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_events_hold_what_metrics_jsonl_holds(tiny_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = dataclasses.replace(tiny_cfg, steps=4, save_every=0, eval_every=2, report_to=["tensorboard"])
    train(cfg, evaluate=_fake_eval)
    out = Path(cfg.out_dir)
    assert list(out.glob("events.out.tfevents.*"))  # beside metrics.jsonl
    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/clip", "train/lr", "train/logit_scale", "train/samples_per_second",
            "eval/zero_shot/shape", "eval/retrieval_r1"} <= tags
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "logit_scale"):
        want = [(r["step"], r[key]) for r in records if key in r]
        got = [(e.step, e.value) for e in acc.Scalars(f"train/{key}")]
        assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert [(e.step, e.value) for e in acc.Scalars("eval/retrieval_r1")] == [(2, 0.5), (4, 0.5)]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_on_resume_drops_the_steps_trained_again(tiny_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = dataclasses.replace(tiny_cfg, steps=6, save_every=2, report_to=["tensorboard"])
    train(dataclasses.replace(cfg, stop_at=3))  # checkpoint at 2 and 3; resume from 3
    train(dataclasses.replace(cfg, resume=str(Path(cfg.out_dir) / "checkpoints" / "step_0000002")))
    acc = EventAccumulator(cfg.out_dir)
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]  # step 3 once, from the resumed run


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline(tiny_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = dataclasses.replace(tiny_cfg, steps=2, save_every=0, report_to=["wandb"])
    train(cfg)
    assert list((Path(cfg.out_dir) / "wandb").glob("offline-run-*"))
