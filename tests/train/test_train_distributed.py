"""Data-parallel training over 2 gloo processes on CPU (clipforge.train.distributed).

The key property: 2 processes with the global batch split between them train the same model as
1 process with the whole batch. Both runs are fp32 and the tiny model has no dropout, so the
only differences are float rounding: the loss sums its rows in two halves, gradients are
summed over ranks before they are averaged. Measured, the losses agree to ~1e-7 and the weights
to ~1e-6 absolute after 4 AdamW steps. The weights are compared with ``rtol=atol=1e-5``:
elementwise relative error alone is not usable, because some parameters (the attention key
bias) get a gradient that is zero up to rounding, which Adam divides by its own tiny running
RMS, so their near-zero values differ by rounding noise times ``lr`` (2e-3). 1e-5 is 0.5% of one
step's largest update (lr), far below what a missing average, a wrong slice or a
dropped micro-batch would change. The logged pre-clip gradient norm, which Adam's scale
invariance would hide from the weights, is compared directly (rel 1e-5).

Two ways of launching are exercised: ``distributed.nproc=2`` (train() starts the processes) and
the torchrun environment (RANK/WORLD_SIZE/... set by this harness, and by torchrun itself in the
command-line test). Every test uses a fresh free port.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipforge.train import DistributedConfig, train
from clipforge.train.checkpoint import list_checkpoints, load_state
from clipforge.train.data import ResumableBatchSampler
from clipforge.train.distributed import free_port

WORLD = 2
TOL = dict(rtol=1e-5, atol=1e-5)  # see the module docstring
TIMEOUT = 120  # seconds a test waits for its processes before it fails instead of hanging


def _cfg(tiny_cfg, out_dir, **kw):
    kw = {"steps": 4, "save_every": 0, **kw}
    return dataclasses.replace(tiny_cfg, out_dir=str(out_dir), **kw)


def _two(cfg):
    return dataclasses.replace(cfg, distributed=DistributedConfig(nproc=WORLD))


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def _metrics(out_dir, key):
    return [r[key] for r in map(json.loads, open(Path(out_dir) / "metrics.jsonl")) if key in r]


# ---------------------------------------------------------------- a torchrun-like harness


def _writes_under(root: str, log: list):
    """An audit hook that records every file-system write under ``root`` made by this process."""
    flags_w = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = ("w" in mode or "a" in mode or "x" in mode or "+" in mode) if isinstance(mode, str) \
                else bool(flags & flags_w)
        elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree"):
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, (str, os.PathLike)) and str(path).startswith(root):
            log.append((event, str(path)))

    return hook


def _rank_worker(rank, port, cfg, queue, options):
    """One rank, started the way torchrun starts it (environment variables), running train()."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import clipforge.train.loop as loop

    writes: list = []
    seen: list = []  # per batch: (indices or keys, epochs)
    if options.get("watch"):
        sys.addaudithook(_writes_under(options["watch"], writes))
    if options.get("poison_rank") == rank:  # a NaN loss on this rank only, at its 3rd loss (step 2)
        original, calls = loop._loss_inputs, [0]

        def poisoned(out, batch, extra=None):
            calls[0] += 1
            inputs = original(out, batch, extra)
            if calls[0] == 3:
                inputs.image_features = inputs.image_features * float("nan")
            return inputs

        loop._loss_inputs = poisoned
    if options.get("broken"):  # every 8th sample unreadable
        _register_broken_shapes(options["broken"])
    original_build = loop.build_loader

    class Recording:  # the loader, noting the samples of each batch this rank receives
        def __init__(self, loader):
            self.loader = loader

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __iter__(self):
            for batch in self.loader:
                if "keys" in batch:  # streamed
                    seen.append((list(batch["keys"]), [p[1] for p in batch["positions"]]))
                else:
                    seen.append((batch["indices"].tolist(), None))
                yield batch

    loop.build_loader = lambda *args, **kwargs: Recording(original_build(*args, **kwargs))
    try:
        result = train(cfg)
        queue.put(
            (
                rank,
                "ok",
                {
                    "losses": result.losses,
                    "params": {k: v.numpy() for k, v in _params(result.model).items()},
                    "samples_seen": result.samples_seen,
                    "skipped": result.skipped,
                    "step": result.step,
                },
                writes,
                seen,
            )
        )
    except Exception as e:  # noqa: BLE001
        queue.put((rank, "error", (type(e).__name__, str(e)), writes, seen))


def _register_broken_shapes(bad_file):
    from clipforge.data import DATASETS
    from clipforge.data.datasets import ShapesDataset

    class Broken(ShapesDataset):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return dict(item, image=bad_file) if i % 8 == 0 else item

    DATASETS.register("broken-shapes-dist", lambda **kw: Broken(**kw), overwrite=True)


def _run_ranks(cfg, **options) -> dict[int, tuple]:
    """Start WORLD ranks with the torchrun environment; {rank: (status, payload, writes, seen)}."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, port, cfg, queue, options)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in range(WORLD):
            rank, *rest = queue.get(timeout=TIMEOUT)  # a hang fails here instead of blocking the suite
            results[rank] = tuple(rest)
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return results


# ---------------------------------------------------------------- the tests


def test_two_processes_train_the_same_model_as_one(tiny_cfg, tmp_path):
    one = train(_cfg(tiny_cfg, tmp_path / "one"))
    two = train(_two(_cfg(tiny_cfg, tmp_path / "two")))  # distributed.nproc=2: train() starts the processes
    assert two.step == one.step == 4 and two.samples_seen == one.samples_seen == 4 * 32
    assert two.losses == pytest.approx(one.losses, rel=1e-6, abs=1e-6)
    # gradients are averaged, not summed: the pre-clip norm that Adam's scale invariance would hide
    assert _metrics(tmp_path / "two", "grad_norm") == pytest.approx(_metrics(tmp_path / "one", "grad_norm"), rel=1e-5)
    _assert_same_weights(_params(one.model), _params(two.model))
    # one process wrote: one metrics line per step (not one per rank), one final checkpoint
    assert _metrics(tmp_path / "two", "step") == [1, 2, 3, 4]
    assert [c.name for c in list_checkpoints(tmp_path / "two")] == ["step_0000004"]


def test_torchrun_environment_with_accumulation_slices_data_and_only_rank0_writes(tiny_cfg, tmp_path):
    # also a frozen text transformer and a logit_bias that the CLIP loss never reads (no gradient on any rank)
    model = {**tiny_cfg.model_overrides, "init_logit_bias": -1.0}
    same = dict(accum_steps=2, save_every=2, freeze=["text.transformer.*"], model_overrides=model)
    cfg = _cfg(tiny_cfg, tmp_path / "two", **same)
    results = _run_ranks(cfg, watch=str(tmp_path))
    one = train(_cfg(tiny_cfg, tmp_path / "one", **same))
    assert one.model.logit_bias.item() == -1.0
    (s0, r0, w0, seen0), (s1, r1, w1, seen1) = results[0], results[1]
    assert s0 == s1 == "ok", (r0, r1)
    # the ranks hold identical weights (same averaged gradients, same step), equal to one process's
    for name in r0["params"]:
        assert (r0["params"][name] == r1["params"][name]).all(), name
    _assert_same_weights(_params(one.model), {k: torch.from_numpy(v) for k, v in r0["params"].items()})
    assert r0["losses"] == r1["losses"] == pytest.approx(one.losses, rel=1e-6, abs=1e-6)
    # each rank trained on its contiguous half of every global batch: 2 micro-batches of 8 per step
    global_batches = [[i for _, i in b] for b in ResumableBatchSampler(256, 16, cfg.seed, 0, 4 * 2)]
    for step in range(4):
        mine = [[i for k in (0, 1) for i in seen[2 * step + k][0]] for seen in (seen0, seen1)]
        both = global_batches[2 * step] + global_batches[2 * step + 1]
        assert [len(m) for m in mine] == [16, 16] and mine[0] + mine[1] == both
    # files: rank 0 wrote the config, metrics and checkpoints; rank 1 wrote nothing at all
    assert w1 == []
    written = {Path(path).name for _, path in w0}
    # (model.safetensors and state.pt are written from C++, which audit hooks do not see; their directory is)
    assert {"metrics.jsonl", "model_config.json", "COMPLETE", ".lock"} <= written, written
    for name in (".tmp_step_0000002.", ".tmp_config.yaml.", ".tmp_latest.json."):  # written under unique names, renamed
        assert any(w.startswith(name) for w in written), (name, written)


def test_a_locked_out_dir_stops_every_rank_with_the_holder_named(tiny_cfg, tmp_path):
    # rank 0 takes the run directory's lock; when another process holds it, rank 1 must not wait for rank 0
    # in a collective (until distributed.timeout_minutes) but stop at once with the same message
    from clipforge.locking import exclusive_lock

    cfg = _cfg(tiny_cfg, tmp_path / "run")
    with exclusive_lock(tmp_path / "run", what="training run"):
        results = _run_ranks(cfg)
    for rank in range(WORLD):
        status, (kind, message), _, _ = results[rank]
        assert status == "error" and kind == "LockHeld", results[rank]
        assert f"is in use by pid {os.getpid()}" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_in_two_processes_and_across_process_counts(tiny_cfg, tmp_path):
    full = train(_two(_cfg(tiny_cfg, tmp_path / "full", save_every=2)))
    half = list_checkpoints(tmp_path / "full")[0]
    assert half.name == "step_0000002" and load_state(half)["samples_seen"] == 2 * 32
    # 2 processes resume from the step-2 checkpoint (every rank reads it) and finish like the uninterrupted run
    resumed = train(_two(_cfg(tiny_cfg, tmp_path / "resumed", resume=str(half))))
    assert resumed.step == 4 and resumed.samples_seen == full.samples_seen
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-6, abs=1e-6)
    _assert_same_weights(_params(full.model), _params(resumed.model))
    # the map-style data order is global, so one process can continue a two-process run (and back)
    alone = train(_cfg(tiny_cfg, tmp_path / "alone", resume=str(half)))
    assert alone.losses == pytest.approx(full.losses[2:], rel=1e-6, abs=1e-6)
    _assert_same_weights(_params(full.model), _params(alone.model))


def test_nan_on_one_rank_stops_every_rank_at_the_same_step(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, tmp_path / "run", save_every=1)
    results = _run_ranks(cfg, poison_rank=1)  # returns (no hang): both ranks stopped
    for rank in range(WORLD):
        status, (kind, message), _, _ = results[rank]
        assert status == "error" and kind == "TrainingDiverged", results[rank]
        assert "loss became nan at step 2; the last good checkpoint is" in message and "step_0000002" in message
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step_0000001", "step_0000002"]


def test_unreadable_samples_keep_ranks_in_step(tiny_cfg, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    cfg = _cfg(tiny_cfg, tmp_path / "run", data=dataclasses.replace(tiny_cfg.data, dataset="broken-shapes-dist"))
    results = _run_ranks(cfg, broken=str(bad))
    (s0, r0, _, _), (s1, r1, _, _) = results[0], results[1]
    assert s0 == s1 == "ok", (r0, r1)
    unreadable = sum(1 for b in ResumableBatchSampler(256, 32, cfg.seed, 0, 4) for _, i in b if i % 8 == 0)
    assert unreadable > 0 and r0["step"] == 4
    # a rank with fewer readable samples sets the size for both: the cut-off ones count as skipped
    assert r0["samples_seen"] + r0["skipped"] == 4 * 32 and r0["skipped"] >= unreadable
    assert r0["samples_seen"] == r1["samples_seen"] and r0["losses"] == r1["losses"]
    for name in r0["params"]:
        assert (r0["params"][name] == r1["params"][name]).all(), name


def _write_stream_shards(root: Path, shards: int = 6, per_shard: int = 8) -> list[str]:
    from clipforge.data import build_dataset
    from clipforge.data.formats import write_webdataset

    ds = build_dataset("shapes", split="train", size=shards * per_shard, seed=0, image_size=32)
    keys = []
    for s in range(shards):
        items = []
        for j in range(per_shard):
            it = ds[s * per_shard + j]
            items.append({"key": f"s{s}_{j:02d}", "image": it["image"], "captions": it["captions"]})
            keys.append(items[-1]["key"])
        write_webdataset(root / f"train-{s:05d}.tar", items)
    return keys


def test_streaming_ranks_read_disjoint_shards_and_resume(tiny_cfg, tmp_path):
    (tmp_path / "shards").mkdir()
    keys = _write_stream_shards(tmp_path / "shards")
    data = dataclasses.replace(tiny_cfg.data, dataset="shards", root=str(tmp_path / "shards"), streaming=True,
                               shuffle_buffer=4)
    cfg = _cfg(tiny_cfg, tmp_path / "run", data=data, batch_size=8, steps=5, save_every=2, keep_checkpoints=0)
    results = _run_ranks(cfg)
    (s0, r0, _, seen0), (s1, r1, _, seen1) = results[0], results[1]
    assert s0 == s1 == "ok", (r0, r1)
    by_rank = [[(k, e) for ks, es in seen for k, e in zip(ks, es)] for seen in (seen0, seen1)]
    assert [len(b) for b in by_rank] == [5 * 4, 5 * 4]  # 4 samples per rank and step
    assert set(by_rank[0]).isdisjoint(by_rank[1])  # never the same sample in the same epoch
    shard_of = lambda key: key.split("_")[0]  # noqa: E731
    assert {shard_of(k) for k, _ in by_rank[0]}.isdisjoint({shard_of(k) for k, _ in by_rank[1]})  # epoch 0 only
    assert all(e == 0 for b in by_rank for _, e in b) and {k for b in by_rank for k, _ in b} <= set(keys)
    assert r0["losses"] == r1["losses"] and r0["samples_seen"] == 5 * 8
    # each rank's stream position is saved; two processes resume from them exactly
    half = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert [s["rank"] for s in load_state(half)["data_stream"]] == [0, 1]
    resumed = train(_two(_cfg(tiny_cfg, tmp_path / "resumed", data=data, batch_size=8, steps=5, resume=str(half))))
    assert resumed.losses == pytest.approx(r0["losses"][2:], rel=1e-6, abs=1e-6)
    stream = _metrics(tmp_path / "resumed", "data_stream")[-1]
    assert stream["samples"] == 5 * 8  # both ranks' streams, over the whole run
    with pytest.raises(ValueError, match="stream positions of 2 processes, this run has 1"):
        train(_cfg(tiny_cfg, tmp_path / "alone", data=data, batch_size=8, steps=5, resume=str(half)))


def test_bad_setups_are_named(tiny_cfg, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"batch_size 32 is the global batch and must split evenly over 3 processes "
                                         r"x accum_steps 1 = 3 slices; use batch_size 30 or 33"):
        train(dataclasses.replace(_cfg(tiny_cfg, tmp_path), distributed=DistributedConfig(nproc=3)))
    with pytest.raises(ValueError, match=r"over 2 processes x accum_steps 4 = 8 slices; use batch_size 24 or 32"):
        train(dataclasses.replace(_two(_cfg(tiny_cfg, tmp_path)), batch_size=28, accum_steps=4))
    with pytest.raises(ValueError, match="instead of lambdas"):
        train(_two(_cfg(tiny_cfg, tmp_path)), evaluate=lambda model, tok: {})
    with pytest.raises(ValueError, match="distributed.nproc must be >= 1"):
        train(dataclasses.replace(_cfg(tiny_cfg, tmp_path), distributed=DistributedConfig(nproc=0)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="start the processes with torchrun"):
        train(_cfg(tiny_cfg, tmp_path))
    for key, value in dict(RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=r"distributed.nproc=3 but the launcher started 2 processes"):
        train(dataclasses.replace(_cfg(tiny_cfg, tmp_path), distributed=DistributedConfig(nproc=3)))


def test_torchrun_command_line(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "clipforge.cli.main", "train",
           "--no-eval", f"out_dir={out}", "steps=2", "batch_size=16", "data.train_size=64", "precision=fp32",
           "progress=false", "warmup_steps=1", "log_every=1",
           "model_overrides={embed_dim: 32, vision: {image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}, "
           "text: {context_length: 16, width: 32, layers: 1, heads: 2}}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 2 steps") == 1  # rank 0 reports, rank 1 stays quiet
    assert [c.name for c in list_checkpoints(out)] == ["step_0000002"]
    assert _metrics(out, "step") == [1, 2]


def test_overlapped_all_reduces_train_the_same_model_as_one_process(tiny_cfg, tmp_path):
    # distributed.overlap=true: the CUDA path (all-reduces launched from gradient hooks during the last backward)
    # forced on the CPU, with accumulation (logit_scale gets its gradient in the first micro-batch only) and a
    # logit_bias the CLIP loss never reads (its bucket never fills up: averaged after the backward)
    model = {**tiny_cfg.model_overrides, "init_logit_bias": -1.0}
    same = dict(accum_steps=2, model_overrides=model)
    one = train(_cfg(tiny_cfg, tmp_path / "one", **same))
    two = train(dataclasses.replace(_cfg(tiny_cfg, tmp_path / "two", **same),
                                    distributed=DistributedConfig(nproc=WORLD, overlap=True)))
    assert two.losses == pytest.approx(one.losses, rel=1e-6, abs=1e-6)
    assert _metrics(tmp_path / "two", "grad_norm") == pytest.approx(_metrics(tmp_path / "one", "grad_norm"), rel=1e-5)
    _assert_same_weights(_params(one.model), _params(two.model))
    assert two.model.logit_bias.item() == -1.0


def test_gradient_overlap_launches_full_buckets_during_backward(tmp_path, monkeypatch):
    import torch.distributed as torch_dist

    import clipforge.train.distributed as distributed
    from clipforge.train.distributed import Dist, GradientOverlap

    monkeypatch.setattr(distributed, "BUCKET_BYTES", 64)  # one bucket per tensor of 16 floats
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        layers = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
        unused = torch.nn.Parameter(torch.ones(4, 4))
        params = [*layers.parameters(), unused]
        overlap = GradientOverlap(Dist(0, 1), params)
        launched_when_first_layer_done: list[int] = []
        # runs when the first layer's gradient is computed, before it is accumulated (and its bucket launched)
        layers[0].weight.register_hook(lambda g: launched_when_first_layer_done.append(len(overlap.works)))
        overlap.arm()
        layers(torch.ones(2, 4)).sum().backward()
        # the second layer's gradient comes first: its all-reduce was under way before backward reached the first
        assert launched_when_first_layer_done == [1]
        assert len(overlap.works) == 2  # the unused parameter's bucket never filled up
        expected = [p.grad.clone() for p in layers.parameters()]
        done = overlap.finish()
        assert done == {id(p) for p in layers.parameters()}
        for p, g in zip(layers.parameters(), expected):
            assert torch.equal(p.grad, g)  # the mean over one rank
        assert unused.grad is None
    finally:
        torch_dist.destroy_process_group()


def test_the_differentiable_gather_warns_about_nothing(tmp_path, monkeypatch):
    """losses/gather.py's all-gather uses no deprecated torch function (torch 2.13 deprecates both of its own
    differentiable all-gathers under some name): gathering over a group of one returns the input and its
    gradient, with no warning at all."""
    import warnings

    import torch.distributed as torch_dist

    from clipforge.losses.gather import gather
    from clipforge.train.distributed import _world_from_env

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert _world_from_env(1) == (0, 1, 0)
            x = torch.randn(3, 4, requires_grad=True)
            y = gather(x, 0, 2)  # world_size > 1 takes the collective (here over a group of one)
            (2 * y).sum().backward()
        assert torch.equal(y, x) and torch.equal(x.grad, torch.full((3, 4), 2.0))
        assert [str(w.message) for w in seen] == []
    finally:
        torch_dist.destroy_process_group()


def _crash_on_rank_one() -> str:
    """Rank 0 returns; rank 1 dies of a segmentation fault, as a crash in native code would (no Python exception)."""
    if os.environ["RANK"] == "1":
        import signal

        os.kill(os.getpid(), signal.SIGSEGV)
    return "rank 0 done"


def test_a_rank_that_crashes_in_native_code_is_named_with_its_signal_and_python_stack(capfd):
    from clipforge.train.distributed import launch

    with pytest.raises(RuntimeError) as caught:
        launch(_crash_on_rank_one, WORLD)
    message = str(caught.value)
    assert "process 1 of 2 was killed by SIGSEGV without reporting" in message
    assert "crash in native code" in message
    # faulthandler, on in every started process, wrote where the crashed process was in Python
    err = capfd.readouterr().err
    assert "Fatal Python error: Segmentation fault" in err and "_crash_on_rank_one" in err


def test_the_launcher_names_how_a_silent_process_ended():
    import signal

    from clipforge.train.exit_signals import silent_exit_message as _silent_exit

    assert "out-of-memory killer" in _silent_exit(0, 2, -signal.SIGKILL)
    assert "stopped from outside" in _silent_exit(1, 2, -signal.SIGTERM)
    assert "Fatal Python error" not in _silent_exit(1, 2, -signal.SIGTERM)  # faulthandler prints nothing for it
    assert "crash in native code" in _silent_exit(1, 2, -signal.SIGABRT)
    assert _silent_exit(1, 4, 3) == "process 1 of 4 exited with code 3 without reporting"
