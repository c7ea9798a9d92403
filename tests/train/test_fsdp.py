"""distributed.strategy=fsdp (clipforge.train.fsdp) and ddp over 2 gloo processes on CPU, against one process.

The reference is always a one-process run of the same config (strategy ddp: a plain model and a plain
``state.pt`` + ``model.safetensors`` checkpoint). Two processes with the global batch split between them must end
with its weights: both runs are fp32 and the tiny model has no dropout, so the only differences are float
rounding (losses summed in halves, gradients reduce-scattered instead of accumulated in one process). The
tolerance is tests/train/test_train_distributed.py's (rtol=atol=1e-5, reasoning in its docstring); a missing
average, a gradient reduced twice or a shard read at the wrong offset moves weights by about lr = 2e-3.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipforge.errors import ConfigError
from clipforge.models import create_model
from clipforge.train import DistributedConfig, train
from clipforge.train.checkpoint import is_sharded_checkpoint, list_checkpoints, load_state
from clipforge.train.distributed import free_port

TOL = dict(rtol=1e-5, atol=1e-5)
TIMEOUT = 150  # seconds a test waits for its processes before it fails instead of hanging
BYOL = {"weight": 1.0, "embed_dim": 32, "hidden_dim": 8}  # trainable heads and an EMA teacher


def _cfg(tiny_cfg, out_dir, **kw):
    kw = {"steps": 2, "save_every": 0, **kw}
    return dataclasses.replace(tiny_cfg, out_dir=str(out_dir), **kw)


def _two(cfg, strategy="fsdp", **kw):
    return dataclasses.replace(cfg, distributed=DistributedConfig(nproc=2, strategy=strategy, **kw))


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def _metrics(out_dir, key):
    return [r[key] for r in map(json.loads, open(Path(out_dir) / "metrics.jsonl")) if key in r]


def _same_as_one_process(tiny_cfg, tmp_path, strategy, **kw):
    one = train(_cfg(tiny_cfg, tmp_path / "one", **kw))
    two = train(_two(_cfg(tiny_cfg, tmp_path / "two", **kw), strategy))
    assert two.step == one.step and two.samples_seen == one.samples_seen
    assert two.losses == pytest.approx(one.losses, rel=1e-6, abs=1e-6)
    _assert_same_weights(_params(one.model), _params(two.model))
    return one, two


# ---------------------------------------------------------------- 2 processes end with 1 process's weights


def test_fsdp_two_processes_train_the_same_model_as_one(tiny_cfg, tmp_path):
    one, two = _same_as_one_process(tiny_cfg, tmp_path, "fsdp")
    # the pre-clip gradient norm, which Adam's scale invariance hides from the weights: shards summed over ranks once
    assert _metrics(tmp_path / "two", "grad_norm") == pytest.approx(_metrics(tmp_path / "one", "grad_norm"), rel=1e-5)
    ckpt = list_checkpoints(tmp_path / "two")[-1]
    assert is_sharded_checkpoint(ckpt)
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # each rank its part


def test_fsdp_with_accumulation_a_frozen_tower_and_a_parameter_without_gradient(tiny_cfg, tmp_path):
    # the whole text tower frozen (LiT-style) and a logit_bias that the CLIP loss never reads (no gradient anywhere)
    model = {**tiny_cfg.model_overrides, "init_logit_bias": -1.0}
    one, two = _same_as_one_process(tiny_cfg, tmp_path, "fsdp", accum_steps=2, freeze=["text.*"],
                                    model_overrides=model)
    assert two.model.logit_bias.item() == -1.0
    fresh = _params(create_model("tiny", seed=tiny_cfg.seed, **model))  # the run's initial weights
    for name, p in _params(two.model).items():  # frozen means unchanged, sharded or not
        if name.startswith("text."):
            assert torch.equal(p, fresh[name]), name


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_siglip_in_two_processes(tiny_cfg, tmp_path, strategy):
    model = {**tiny_cfg.model_overrides, "init_logit_bias": -10.0, "init_logit_scale": 2.3026}
    one, two = _same_as_one_process(tiny_cfg, tmp_path, strategy, loss={"siglip": 1.0}, model_overrides=model)
    assert two.model.logit_bias.item() != -10.0  # SigLIP trains its bias (replicated, averaged by hand)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_term_that_leaves_a_tower_without_gradient(tiny_cfg, tmp_path, strategy):
    # SimCLR reads two views of each image and no text: the text tower runs but never receives a gradient
    one, two = _same_as_one_process(tiny_cfg, tmp_path, strategy, loss={"simclr": 1.0})
    start = create_model("tiny", seed=tiny_cfg.seed, **tiny_cfg.model_overrides)  # the run's initial weights
    assert torch.equal(two.model.text.proj, start.text.proj)


def test_fsdp_with_trainable_heads_an_ema_teacher_and_token_features(tiny_cfg, tmp_path):
    # BYOL: predictor heads (replicated) and an EMA teacher (a full copy, updated from gathered shards);
    # Norton reads token features through the towers' forward_tokens/pool/project (registered FSDP methods)
    loss = {"clip": 1.0, "byol": BYOL, "norton": {"weight": 0.5, "iters": 5}}
    _same_as_one_process(tiny_cfg, tmp_path, "fsdp", loss=loss, steps=2)
    one = load_state(list_checkpoints(tmp_path / "one")[-1])
    two = load_state(list_checkpoints(tmp_path / "two")[-1])
    for part in ("loss_terms", "ema"):
        for key in one[part]:
            torch.testing.assert_close(two[part][key], one[part][key], **TOL, msg=lambda m, k=key: f"{k}: {m}")


# ---------------------------------------------------------------- sharded checkpoints


def _flat_checkpoint(ckpt: Path, tmp: Path) -> dict:
    """A sharded checkpoint as one flat dict of full tensors (torch's own converter: an independent reader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, tmp)
    nested = torch.load(tmp, weights_only=False)

    def flat(tree, prefix=""):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    return {k: v for k, v in flat(nested).items() if torch.is_tensor(v)}


def test_sharded_checkpoints_resume_from_two_processes_in_one(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, tmp_path / "two", steps=4, save_every=2, keep_checkpoints=0)
    train(_two(cfg))
    half = list_checkpoints(tmp_path / "two")[0]
    assert half.name == "step_0000002" and is_sharded_checkpoint(half)
    # 1 process with strategy=fsdp writes the same checkpoint (weights, AdamW moments, keyed by name) as 2 do
    alone = dataclasses.replace(cfg, out_dir=str(tmp_path / "one"), distributed=DistributedConfig(strategy="fsdp"))
    full = train(alone)
    written_by_one = list_checkpoints(tmp_path / "one")[0]
    a, b = _flat_checkpoint(written_by_one, tmp_path / "a.pt"), _flat_checkpoint(half, tmp_path / "b.pt")
    assert a.keys() == b.keys() and any(".exp_avg_sq" in k for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")
    assert load_state(half)["samples_seen"] == load_state(written_by_one)["samples_seen"] == 2 * 32
    # 2 -> 1: one process continues the two-process run and ends where the uninterrupted run ends
    resumed = train(dataclasses.replace(alone, out_dir=str(tmp_path / "2to1"), resume=str(half)))
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-6, abs=1e-6)
    _assert_same_weights(_params(full.model), _params(resumed.model))


def test_sharded_checkpoints_resume_from_one_process_in_two(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, tmp_path / "one", steps=4, save_every=2, keep_checkpoints=0,
               distributed=DistributedConfig(strategy="fsdp"))
    full = train(cfg)
    half = list_checkpoints(tmp_path / "one")[0]
    assert half.name == "step_0000002" and is_sharded_checkpoint(half)
    resumed = train(_two(dataclasses.replace(cfg, out_dir=str(tmp_path / "1to2"), resume=str(half))))
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-6, abs=1e-6)
    _assert_same_weights(_params(full.model), _params(resumed.model))
    assert load_state(list_checkpoints(tmp_path / "1to2")[-1])["samples_seen"] == 4 * 32


def test_clipforge_load_reads_a_sharded_run_and_export_consolidates_it(tiny_cfg, tmp_path):
    from clipforge.cli.main import main
    from clipforge.interop import load
    from clipforge.models import load_model

    run = train(_two(_cfg(tiny_cfg, tmp_path / "run", steps=2)))
    model, _, _ = load(str(tmp_path / "run"))  # the run directory: its newest (sharded) checkpoint
    _assert_same_weights(_params(run.model), _params(model))
    assert main(["export", str(tmp_path / "run"), "--to", "clipforge", "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "model.safetensors").is_file()
    exported = load_model(tmp_path / "export")
    for name, p in _params(run.model).items():
        assert torch.equal(_params(exported)[name], p), name


# ---------------------------------------------------------------- a rank that dies


def _dying_rank(rank, port, cfg, die_at_call, queue):
    """One rank started as torchrun starts it; rank 1 kills itself (SIGKILL) at its ``die_at_call``-th loss."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import clipforge.train.loop as loop

    if rank == 1:
        original, calls = loop._loss_inputs, [0]

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] == die_at_call:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        loop._loss_inputs = dying
    started = time.monotonic()
    try:
        train(cfg)
        queue.put((rank, "ok", "", 0.0))
    except Exception as e:  # noqa: BLE001
        queue.put((rank, type(e).__name__, str(e), time.monotonic() - started))


def test_a_killed_rank_stops_the_other_with_a_clear_message_and_the_run_resumes(tiny_cfg, tmp_path):
    cfg = _two(_cfg(tiny_cfg, tmp_path / "run", steps=5, save_every=2, keep_checkpoints=0), timeout_minutes=0.5)
    ctx = torch.multiprocessing.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_dying_rank, args=(r, port, cfg, 4, queue)) for r in range(2)]  # dies in step 4
    for p in procs:
        p.start()
    try:
        rank, kind, message, seconds = queue.get(timeout=TIMEOUT)  # the survivor reports; no hang
        procs[1].join(30)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert procs[1].exitcode == -signal.SIGKILL
    assert rank == 0 and kind == "DistributedRunStopped", (kind, message)
    assert "another process of the run stopped" in message and "step_0000002" in message and "resume" in message
    assert seconds < 0.5 * 60 + 30  # within distributed.timeout_minutes (plus start-up)
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step_0000002"]  # nothing half-written is listed
    resumed = train(dataclasses.replace(cfg, resume="latest"))
    reference = train(_cfg(tiny_cfg, tmp_path / "one", steps=5))
    assert resumed.step == 5 and resumed.losses == pytest.approx(reference.losses[2:], rel=1e-6, abs=1e-6)
    _assert_same_weights(_params(reference.model), _params(resumed.model))


# ---------------------------------------------------------------- launching on two "nodes"


TINY = ("model_overrides={embed_dim: 32, vision: {image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}, "
        "text: {context_length: 16, width: 32, layers: 1, heads: 2}}")


def _cli(out, *extra):
    return ["-m", "clipforge.cli.main", "train", "--no-eval", f"out_dir={out}", "steps=2", "batch_size=16",
            "data.train_size=64", "precision=fp32", "progress=false", "warmup_steps=1", "log_every=1", TINY, *extra]


def test_two_nodes_with_torchrun_train_together_like_one_process(tmp_path):
    from clipforge.models import load_model

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--rdzv_endpoint", endpoint,
                               *_cli(tmp_path / "two", "distributed.strategy=fsdp")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    outputs = [n.communicate(timeout=TIMEOUT) for n in nodes]
    for n, (_, err) in zip(nodes, outputs):
        assert n.returncode == 0, err[-3000:]
    assert outputs[0][0].count("trained 2 steps") + outputs[1][0].count("trained 2 steps") == 1  # rank 0 reports
    one = subprocess.run([sys.executable, *_cli(tmp_path / "one")], capture_output=True, text=True, env=env,
                         timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    assert _metrics(tmp_path / "two", "loss") == pytest.approx(_metrics(tmp_path / "one", "loss"), rel=1e-6, abs=1e-6)
    _assert_same_weights(_params(load_model(tmp_path / "one")), _params(load_model(tmp_path / "two")))


# ---------------------------------------------------------------- bad input


def test_bad_fsdp_setups_are_named(tiny_cfg, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="distributed.strategy must be one of ddp, fsdp, got 'zero3'"):
        train(dataclasses.replace(_cfg(tiny_cfg, tmp_path / "a"), distributed=DistributedConfig(strategy="zero3")))
    with pytest.raises(ValueError, match=r"over 2 processes x accum_steps 2 = 4 slices; use batch_size 28 or 32"):
        train(_two(_cfg(tiny_cfg, tmp_path / "b", batch_size=30, accum_steps=2)))
    # a model whose image tower has no transformer blocks: refused before anything is written
    mobile = _cfg(tiny_cfg, tmp_path / "c", model="mobileclip-tiny", model_overrides={},
                  distributed=DistributedConfig(strategy="fsdp"))
    with pytest.raises(ConfigError, match=r"strategy=fsdp cannot shard this model: its visual tower \(MCi\) has no "
                                          r"clipforge transformer blocks .* Train it with distributed.strategy=ddp"):
        train(mobile)
    assert not (tmp_path / "c" / "checkpoints").exists()
    # a sharded checkpoint of another architecture: named, and the run's checkpoints are untouched
    train(_cfg(tiny_cfg, tmp_path / "d", steps=2, distributed=DistributedConfig(strategy="fsdp")))
    before = sorted(p.name for p in (tmp_path / "d" / "checkpoints").iterdir())
    wider = {**tiny_cfg.model_overrides, "embed_dim": 48}
    with pytest.raises(ConfigError, match="is not the architecture of"):
        train(_cfg(tiny_cfg, tmp_path / "d", steps=4, model_overrides=wider, resume="latest",
                   distributed=DistributedConfig(strategy="fsdp")))
    assert sorted(p.name for p in (tmp_path / "d" / "checkpoints").iterdir()) == before
    # a replicated (ddp) checkpoint cannot be resumed sharded over 2 processes
    train(_cfg(tiny_cfg, tmp_path / "e", steps=2))
    with pytest.raises(ConfigError, match="was written with distributed.strategy=ddp"):
        train(_two(_cfg(tiny_cfg, tmp_path / "e", steps=4, resume="latest")))
    # no rendezvous endpoint
    for key, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="no rendezvous endpoint"):
        train(_cfg(tiny_cfg, tmp_path / "f"))
