"""Part-1 terms with non-default options on 2 gloo CPU processes: the mean of the per-rank
losses equals the single-process loss on the whole batch, and each rank's feature gradients
divided by the world size (DDP averages) equal the single-process ones. (The default options
of every term are covered by test_distributed.py.)"""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clipforge import losses
from clipforge.losses import LossInputs

TERMS = [("clip", {"label_smoothing": 0.1}), ("clip", {"label_smoothing": 0.1, "chunk_size": 3}),
         ("cwcl", {"reference": "text", "symmetric": False}), ("cwcl", {"weights_key": "teacher"}),
         ("symile", {"negatives": "n_squared"}), ("m2mix", {"mix_scale": 5.0}), ("uniformity", {"t": 1.0}),
         ("alignment", {"alpha": 1.0}), ("cloob", {"tau": 0.2, "beta": 3.0}), ("simclr", {"temperature": 0.5})]
WORLD, LOCAL, DIM = 2, 3, 5


def batch():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.functional.normalize(torch.randn(WORLD * LOCAL, DIM, generator=g, dtype=torch.float64), dim=-1)
            for _ in range(5)]


def inputs_for(data, sl, rank, world):
    img, txt = data[0][sl].clone().requires_grad_(), data[1][sl].clone().requires_grad_()
    extra = {"modality_features": [data[2][sl]], "teacher": data[3][sl], "image_features_view2": data[4][sl],
             "m2mix_lambda": 0.4}
    scale = torch.tensor(3.0, dtype=torch.float64)
    return LossInputs(img, txt, scale, extra=extra, rank=rank, world_size=world), (img, txt)


def worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        data, sl, out = batch(), slice(rank * LOCAL, (rank + 1) * LOCAL), []
        for name, opts in TERMS:
            li, leaves = inputs_for(data, sl, rank, WORLD)
            loss = losses.build(name, **opts)(li)["loss"]
            loss.backward()
            out.append((loss.item(), [(grad(t) / WORLD).numpy() for t in leaves]))
        queue.put((rank, out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def grad(t):
    return torch.zeros_like(t) if t.grad is None else t.grad  # e.g. simclr never reads the text features


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_options_across_two_processes():
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=worker, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in range(WORLD))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    data = batch()
    for k, (name, opts) in enumerate(TERMS):
        li, leaves = inputs_for(data, slice(None), 0, 1)
        loss = losses.build(name, **opts)(li)["loss"]
        loss.backward()
        assert abs(sum(results[r][k][0] for r in range(WORLD)) / WORLD - loss.item()) < 1e-9, (name, opts)
        for r in range(WORLD):
            sl = slice(r * LOCAL, (r + 1) * LOCAL)
            for theirs, leaf in zip(results[r][k][1], leaves):
                assert torch.allclose(torch.from_numpy(theirs), grad(leaf)[sl], atol=1e-9), (name, opts)
