"""Harness for checking loss terms across processes: spawn WORLD gloo processes, let each
compute every term on its slice of one batch (features gathered with gradients), and compare
the mean loss and each rank's gradients with one process computing the whole batch.

A test module defines ``TERMS`` [(name, options)], ``WORLD``, ``LOCAL``, ``batch()`` and
``inputs_for(data, slice, rank, world) -> (LossInputs, leaves)``, then calls
``check_terms_across_processes(__name__)``; ``run_terms_across_processes(__name__)`` returns the
per-rank results for a test that compares them with its own reference."""
from __future__ import annotations

import datetime
import importlib
import os
import queue as queue_module
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipforge import losses


def grad(t):
    return torch.zeros_like(t) if t.grad is None else t.grad  # e.g. simclr never reads the text features


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, queue, module_name):
    spec = importlib.import_module(module_name)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=spec.WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        data, sl, out = spec.batch(), slice(rank * spec.LOCAL, (rank + 1) * spec.LOCAL), []
        for name, opts in spec.TERMS:
            li, leaves = spec.inputs_for(data, sl, rank, spec.WORLD)
            loss = losses.build(name, **opts)(li)["loss"]
            loss.backward()
            out.append((loss.item(), [(grad(t) / spec.WORLD).numpy() for t in leaves]))  # by value
        queue.put((rank, out))
        dist.barrier()
    except BaseException:
        queue.put((rank, traceback.format_exc()))  # the parent reports it instead of waiting for a result
        raise
    finally:
        dist.destroy_process_group()


def run_terms_across_processes(module_name: str) -> dict[int, list]:
    """rank -> [(loss, [gradient of each leaf / WORLD, as numpy]) for each of the module's TERMS].

    Tried twice: the free port can be taken by another process between choosing and binding it, which
    fails the rendezvous; a term that raises fails both tries, and its traceback is in the message."""
    try:
        return _run_once(module_name)
    except AssertionError:
        return _run_once(module_name)


def _run_once(module_name: str) -> dict[int, list]:
    return collect_from_processes(_worker, importlib.import_module(module_name).WORLD, module_name)


def collect_from_processes(target, world: int, *args) -> dict[int, object]:
    """Start ``world`` spawned processes running ``target(rank, port, queue, *args)`` (a free port for their
    rendezvous) and return rank -> what each put on the queue as ``(rank, result)``; a process that puts a string
    (its traceback) fails the caller with it, one that dies without a word fails it with its exit code."""
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(r, port, queue, *args)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    deadline = time.monotonic() + 300  # generous on a loaded 2-core machine; a dead rank is noticed at once
    while len(results) < world and time.monotonic() < deadline:
        try:
            rank, out = queue.get(timeout=2)
        except queue_module.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"a worker died without a result (exit codes {dead}: negative = killed by that signal)"
            continue
        assert not isinstance(out, str), f"rank {rank} failed:\n{out}"
        results[rank] = out
    assert len(results) == world, f"only ranks {sorted(results)} reported within 300 s"
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


def check_terms_across_processes(module_name: str) -> None:
    spec = importlib.import_module(module_name)
    results = run_terms_across_processes(module_name)
    data = spec.batch()
    for k, (name, opts) in enumerate(spec.TERMS):
        li, leaves = spec.inputs_for(data, slice(None), 0, 1)
        loss = losses.build(name, **opts)(li)["loss"]
        loss.backward()
        mean = sum(results[r][k][0] for r in range(spec.WORLD)) / spec.WORLD
        assert abs(mean - loss.item()) < 1e-9, (name, opts)
        for r in range(spec.WORLD):
            sl = slice(r * spec.LOCAL, (r + 1) * spec.LOCAL)
            for which, (theirs, leaf) in enumerate(zip(results[r][k][1], leaves)):
                assert torch.allclose(torch.from_numpy(theirs), grad(leaf)[sl], atol=1e-9), (name, opts, which)
