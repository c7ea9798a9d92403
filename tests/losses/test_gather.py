"""The differentiable all-gather of the global losses (clipforge.losses.gather) across 2 gloo processes: values
and gradients equal one process computing the whole batch, with many gathers of one step in flight at once."""
from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist
from reference.distributed import collect_from_processes

from clipforge.losses.gather import gather, local_offset

WORLD, LOCAL, DIM, TENSORS, STEPS = 2, 4, 32, 12, 200


def _features(step: int) -> list[torch.Tensor]:
    """The whole batch of each of the step's TENSORS feature tensors, [WORLD * LOCAL, DIM], float64."""
    g = torch.Generator().manual_seed(step)
    return [torch.randn(WORLD * LOCAL, DIM, generator=g, dtype=torch.float64) for _ in range(TENSORS)]


def _loss(gathered: list[torch.Tensor], local: list[torch.Tensor]) -> torch.Tensor:
    """Each local row against every gathered row of the next tensor (a contrastive-style log-sum-exp), so that
    each row's gradient depends on every process's rows."""
    return sum((loc @ nxt.t()).logsumexp(-1).sum() for loc, nxt in zip(local, gathered[1:] + gathered[:1]))


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        sl = slice(local_offset(LOCAL, rank), local_offset(LOCAL, rank) + LOCAL)
        out = []
        for step in range(STEPS):
            leaves = [f[sl].clone().requires_grad_() for f in _features(step)]
            local = [2.0 * x for x in leaves]  # temporaries: nothing but the gather holds them
            gathered = [gather(x, rank, WORLD) for x in local]  # all TENSORS gathers issued before any is read
            loss = _loss(gathered, local)
            loss.backward()
            out.append((loss.item(), [x.grad.numpy() for x in leaves], [g.detach().numpy() for g in gathered]))
        queue.put((rank, out))
        dist.barrier()
    except BaseException:
        queue.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def test_many_gathers_in_flight_match_one_process():
    """200 steps of 12 gathers each, all issued before the loss reads any (torch 2.13's asynchronous functional
    all-gather corrupted the heap in this pattern on gloo; see AllGatherWithGrad). Reference: one process with
    the whole batch, where the gathered tensors are the full feature tensors; the sum of the ranks' losses is
    the whole-batch loss and each rank's rows get the whole-batch gradient."""
    results = collect_from_processes(_worker, WORLD)
    for step in range(STEPS):
        leaves = [f.clone().requires_grad_() for f in _features(step)]
        full = [2.0 * x for x in leaves]
        _loss(full, full).backward()
        total = sum(results[r][step][0] for r in range(WORLD))
        assert abs(total - _loss(full, full).item()) < 1e-9
        for r in range(WORLD):
            sl = slice(r * LOCAL, (r + 1) * LOCAL)
            for k in range(TENSORS):
                assert torch.equal(torch.from_numpy(results[r][step][2][k]), full[k].detach())  # rank order
                assert torch.allclose(torch.from_numpy(results[r][step][1][k]), leaves[k].grad[sl], atol=1e-12)
