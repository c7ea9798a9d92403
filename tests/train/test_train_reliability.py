"""Training runs that never lose work (issue 20): the run-directory lock, atomic checkpoints that
survive a crash at any point of a save, resume with changed hyperparameters, checkpoints that are
promoted only when their weights work, and metrics.jsonl after a resume.

A crash is simulated by raising ``Killed`` (a ``BaseException``, which no ``except Exception`` in
the code under test catches, as nothing catches ``kill -9``) at a chosen point of a save.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clipforge.train.checkpoint as checkpoint
from clipforge.locking import LockHeld
from clipforge.models import load_model
from clipforge.train import TrainingDiverged, train
from clipforge.train.checkpoint import list_checkpoints, load_state, resolve_checkpoint


class Killed(BaseException):
    """Stands for kill -9: nothing in the code under test catches it."""


def _tree(root) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` except the lock file."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _probe_finite(model) -> bool:
    """Independent check that a model's weights work: finite features for random images and token ids."""
    images = torch.rand(2, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(1, 400, (2, model.context_length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return bool(torch.isfinite(model.encode_image(images)).all() and torch.isfinite(model.encode_text(ids)).all())


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------- the run-directory lock


def _hold_lock(directory: Path):
    """Another process holding the training-run lock on ``directory``; returns it once the lock is held."""
    code = ("import sys, time; from clipforge.locking import exclusive_lock\n"
            "with exclusive_lock(sys.argv[1], what='training run'):\n"
            "    print('held', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_into_a_locked_out_dir_fails_and_leaves_the_files(tiny_cfg):
    first = train(dataclasses.replace(tiny_cfg, steps=4))
    before = _tree(first.out_dir)
    holder = _hold_lock(Path(tiny_cfg.out_dir))
    try:
        with pytest.raises(LockHeld, match=rf"training run '.*run' is in use by pid {holder.pid} on "):
            train(dataclasses.replace(tiny_cfg, steps=8, resume="latest"))
        with pytest.raises(LockHeld):  # a fresh run into the same directory too
            train(dataclasses.replace(tiny_cfg, steps=2))
    finally:
        holder.kill()
        holder.wait()
    assert _tree(first.out_dir) == before


def test_lock_of_a_killed_run_is_taken_over_with_a_message(tiny_cfg, caplog):
    train(dataclasses.replace(tiny_cfg, steps=4))
    holder = _hold_lock(Path(tiny_cfg.out_dir))
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert f"pid={holder.pid}" in (Path(tiny_cfg.out_dir) / ".lock").read_text()  # the dead holder's record stays
    with caplog.at_level(logging.WARNING, logger="clipforge.locking"):
        result = train(dataclasses.replace(tiny_cfg, steps=8, resume="latest"))
    assert result.step == 8
    assert f"took over a stale lock left by pid {holder.pid}" in caplog.text


# ---------------------------------------------------------------- atomic checkpoints


def _kill_at(monkeypatch, point: str, step_name: str):
    """Raise Killed at ``point`` of the save of checkpoint ``step_name`` (and only there)."""
    if point == "weights":
        original = checkpoint.save_model

        def save_model(model, directory, metadata=None):
            if metadata and metadata.get("step") == str(int(step_name.split("_")[1])):
                raise Killed
            return original(model, directory, metadata)

        monkeypatch.setattr(checkpoint, "save_model", save_model)
        return
    if point == "state":
        original_save = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("step") == int(step_name.split("_")[1]):
                Path(f).write_bytes(b"trunc")  # half-written, then the process dies
                raise Killed
            return original_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
        return
    original_replace, original_rmtree = os.replace, checkpoint.shutil.rmtree

    def replace(src, dst, *args, **kwargs):
        if point == "promote" and Path(dst).name == step_name:
            raise Killed
        if point == "latest" and Path(dst).name == "latest.json" and step_name in Path(src).read_text():
            raise Killed
        return original_replace(src, dst, *args, **kwargs)

    def rmtree(path, *args, **kwargs):  # the pruning of old checkpoints, cut short after one file
        if point == "prune" and "step_0000004" in str(path):
            (Path(path) / "model.safetensors").unlink()
            raise Killed
        return original_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)


@pytest.mark.parametrize("point", ["weights", "state", "promote", "latest", "prune"])
def test_a_crash_at_any_point_of_the_last_save_leaves_a_loadable_run(tiny_cfg, monkeypatch, point):
    # steps=12, save_every=4: checkpoints 4, 8 and the end-of-run save of 12 (12 is on the save cadence)
    reference = train(dataclasses.replace(tiny_cfg, out_dir=tiny_cfg.out_dir + "_ref"))
    with monkeypatch.context() as m:
        _kill_at(m, point, "step_0000012")
        with pytest.raises(Killed):
            train(tiny_cfg)
    complete = list_checkpoints(tiny_cfg.out_dir)
    assert complete
    assert all((c / "model.safetensors").exists() and (c / "state.pt").stat().st_size > 100 for c in complete)
    expected = "step_0000012" if point in ("latest", "prune") else "step_0000008"
    assert complete[-1].name == expected
    # clipforge.load_model on the run directory and resume=latest both find a complete checkpoint
    # (after a crash between promoting step 12 and updating latest.json, load_model still reads step 8: complete too)
    model = load_model(tiny_cfg.out_dir)
    assert any(_same_weights(model, load_model(c)) for c in complete)
    resumed = train(dataclasses.replace(tiny_cfg, resume="latest"))
    assert resumed.step == 12
    assert _same_weights(load_model(tiny_cfg.out_dir), load_model(list_checkpoints(tiny_cfg.out_dir)[-1]))
    for p in resumed.model.state_dict():
        assert torch.allclose(resumed.model.state_dict()[p], reference.model.state_dict()[p], atol=1e-6), p


def test_final_step_is_saved_once(tiny_cfg, monkeypatch):
    calls = []
    original = checkpoint.save_model
    monkeypatch.setattr(checkpoint, "save_model", lambda model, d, metadata=None: calls.append(metadata["step"])
                        or original(model, d, metadata))
    train(tiny_cfg)  # steps=12, save_every=4
    assert calls == ["4", "8", "12"]


def test_resume_skips_incomplete_checkpoints_and_says_so(tiny_cfg, caplog):
    train(dataclasses.replace(tiny_cfg, steps=8))
    root = Path(tiny_cfg.out_dir) / "checkpoints"
    # an interrupted save left a newer directory with some files, and the newest complete one lost bytes
    partial = root / "step_0000011"
    partial.mkdir()
    (partial / "model_config.json").write_text((root / "step_0000008" / "model_config.json").read_text())
    assert [c.name for c in list_checkpoints(tiny_cfg.out_dir)] == ["step_0000004", "step_0000008"]
    weights = root / "step_0000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING, logger="clipforge.train.checkpoint"):
        found = resolve_checkpoint(tiny_cfg.out_dir, "latest")
    assert found.name == "step_0000004"
    assert "step_0000008" in caplog.text and "incomplete" in caplog.text
    assert load_state(found)["step"] == 4


def test_no_complete_checkpoint_is_a_clear_error(tiny_cfg):
    root = Path(tiny_cfg.out_dir) / "checkpoints" / "step_0000004"
    root.mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint.*start without resume"):
        resolve_checkpoint(tiny_cfg.out_dir, "latest")


# ---------------------------------------------------------------- resume with changed settings


def _schedule(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup then cosine to lr * min_ratio, written out here from the documented formula."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / (total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * t)) / 2)


def test_resume_applies_changed_hyperparameters_and_logs_them(tiny_cfg, monkeypatch, caplog):
    import clipforge.train.loop as loop

    train(dataclasses.replace(tiny_cfg, stop_at=6))  # lr 2e-3, warmup 2, 12 steps
    seen: list[tuple[float, float, float]] = []  # (lr, weight_decay of the decayed group, eps) at each optimizer step
    original = loop.build_optimizer

    def recording(*args, **kwargs):
        opt = original(*args, **kwargs)

        def before_step(optimizer, args, kwargs):
            g = optimizer.param_groups[0]
            seen.append((g["lr"], g["weight_decay"], g["eps"]))

        opt.register_step_pre_hook(before_step)
        return opt

    monkeypatch.setattr(loop, "build_optimizer", recording)
    new = dataclasses.replace(tiny_cfg, resume="latest", lr=5e-4, weight_decay=0.01, eps=1e-8, min_lr_ratio=0.1)
    with caplog.at_level(logging.INFO, logger="clipforge.train.loop"):
        result = train(new)
    assert result.step == 12 and len(seen) == 6
    for k, (lr, wd, eps) in enumerate(seen):
        assert lr == pytest.approx(_schedule(6 + k, 5e-4, 2, 12, 0.1), rel=1e-9), k
        assert (wd, eps) == (0.01, 1e-8)
    assert "lr: 0.002 -> 0.0005" in caplog.text and "weight_decay: 0.1 -> 0.01" in caplog.text
    assert "lr: 0.0005" in (Path(tiny_cfg.out_dir) / "config.yaml").read_text()
    # the checkpoints written after the resume hold the new schedule
    assert load_state(list_checkpoints(tiny_cfg.out_dir)[-1])["scheduler"]["base_lrs"] == [5e-4, 5e-4]


def test_resume_refuses_a_changed_architecture(tiny_cfg):
    train(dataclasses.replace(tiny_cfg, stop_at=4))
    overrides = json.loads(json.dumps(tiny_cfg.model_overrides))
    overrides["vision"]["heads"] = 4  # same tensor shapes, another model
    with pytest.raises(ValueError, match=r"resume.*architecture.*vision\.heads: 2 -> 4"):
        train(dataclasses.replace(tiny_cfg, resume="latest", model_overrides=overrides))


# ---------------------------------------------------------------- divergence


def test_exploded_weights_are_never_promoted_and_the_message_names_the_last_good_checkpoint(tiny_cfg):
    # lr 1e3 with weight decay multiplies the weights by about -99 per step: finite but useless within a few steps
    cfg = dataclasses.replace(tiny_cfg, lr=1e3, warmup_steps=1, save_every=1, keep_checkpoints=0)
    with pytest.raises(TrainingDiverged) as err:
        train(cfg)
    message = str(err.value)
    named = [c for c in list_checkpoints(cfg.out_dir) if c.name in message]
    assert len(named) == 1, message
    assert _probe_finite(load_model(named[0]))
    assert list_checkpoints(cfg.out_dir)[-1] == named[0]  # nothing later was promoted
    assert all(_probe_finite(load_model(c)) for c in list_checkpoints(cfg.out_dir))
    assert _same_weights(load_model(cfg.out_dir), load_model(named[0]))


# ---------------------------------------------------------------- metrics.jsonl after a resume


def test_metrics_after_a_resume_hold_each_step_once(tiny_cfg, monkeypatch):
    import clipforge.train.loop as loop

    original, calls = loop._loss_inputs, [0]

    def dies_at_step_7(out, batch, extra=None):
        calls[0] += 1
        if calls[0] == 7:
            raise Killed
        return original(out, batch, extra)

    with monkeypatch.context() as m:
        m.setattr(loop, "_loss_inputs", dies_at_step_7)
        with pytest.raises(Killed):
            train(tiny_cfg)  # metrics of steps 1..6 written, the last checkpoint is step 4
    path = Path(tiny_cfg.out_dir) / "metrics.jsonl"
    crashed = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in crashed if "loss" in r] == [1, 2, 3, 4, 5, 6]
    train(dataclasses.replace(tiny_cfg, resume="latest"))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    marks = [r for r in records if "resume" in r]
    assert len(marks) == 1 and marks[0]["step"] == 4 and marks[0]["resume"]["checkpoint"].endswith("step_0000004")
    # the superseded records of steps 5 and 6 are kept aside, not lost
    aside_file = Path(tiny_cfg.out_dir) / "metrics.superseded.jsonl"
    aside = [json.loads(line) for line in aside_file.read_text().splitlines()]
    assert [r["step"] for r in aside] == [5, 6] and aside == crashed[4:6]
