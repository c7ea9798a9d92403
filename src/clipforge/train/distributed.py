"""Data-parallel training over several processes with ``torch.distributed`` (gloo on CPU, nccl on CUDA).

Two ways to start a run, one program:

- **torchrun** (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``)::

      torchrun --nproc_per_node 2 -m clipforge.cli.main train batch_size=256 ...

  Every process runs ``clipforge train``; :func:`process_group` joins them from those variables.
- **SLURM**: ``srun clipforge train ...`` with several tasks; :func:`adopt_slurm_environment` derives
  those variables from SLURM's (docs/distributed.md has an sbatch script).
- **``distributed.nproc=N``** in the config: ``clipforge train`` starts the N local processes
  itself (:func:`launch`), sets the same variables for each and runs the same program in them;
  the calling process waits, re-raises the first error a process reported (stopping the others),
  and returns rank 0's result. Each process gets ``torch.get_num_threads() // N`` threads.

What the processes share (see :mod:`clipforge.train.loop`): ``batch_size`` is the **global**
batch. Every rank draws the same deterministic order and keeps its own contiguous slice of each
global batch (:class:`clipforge.train.data.RankSlices`), so N ranks see together exactly the
samples one process would, in the same order. The loss terms gather features across ranks
(:mod:`clipforge.losses.gather`), so the loss is the full-batch loss; gradients are averaged
(:meth:`Dist.average_gradients`), so every rank takes the same optimizer step and the weights
stay identical without ever being sent again. Only rank 0 writes (checkpoints, metrics, config,
stored rewrites or teacher embeddings), logs, shows progress and evaluates; every rank resumes
from the same checkpoint. A non-finite loss on any rank stops every rank at the same step,
because the value each rank checks is the mean over ranks.

Why gradients are averaged with explicit all-reduces and not ``DistributedDataParallel``: DDP
reduces gradients from hooks armed in its ``forward`` and expects every parameter that its
forward output reaches to receive a gradient in the next backward. The loop breaks both
assumptions. (1) With ``accum_steps > 1`` each step runs the model once without gradients
for the feature cache and then once per micro-batch with gradients, one backward each, and from the
second micro-batch on ``logit_scale``/``logit_bias`` are detached (the full-batch loss gives
them gradient once); (2) the loss terms decide which outputs they read, so a parameter such
as ``logit_bias`` under the CLIP loss, or the whole text tower under SimCLR, is reachable
from the forward output yet never gets a gradient, which stalls DDP's reducer even with
``find_unused_parameters=True`` (that search starts from the forward output, not the loss);
(3) hard-negative and count captions go through ``model.encode_text`` outside the wrapper's
forward. Averaging once per optimizer step, after all micro-batches, in ~25 MB buckets (DDP's
default bucket size) is exactly DDP's arithmetic without those constraints. DDP's overlap of
communication with the backward pass is kept by :class:`GradientOverlap`: hooks on the parameters
(``register_post_accumulate_grad_hook``, which fire wherever the gradient comes from, inside or outside
a wrapper's forward) launch each bucket's all-reduce asynchronously as soon as its gradients are
complete, during the step's last backward only; buckets that do not fill up (parameters without
gradient) are averaged after the backward as before. It is on by default on CUDA (nccl), where the
overlap pays; on the CPU (gloo) the plain path stays the default and ``distributed.overlap=true``
selects the overlapped one, which the tests check against one process. ``distributed.strategy=fsdp``
shards the model instead (:mod:`clipforge.train.fsdp`).
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing.connection
import os
import pickle
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..errors import ClipforgeError, ConfigError
from .data import trim_batch

BUCKET_BYTES = 25 * 2**20  # gradients all-reduced per bucket, DDP's default bucket_cap_mb
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
GRACE_SECONDS = 10.0  # after one process fails, how long the others get to report before they are stopped


@dataclass(frozen=True)
class Dist:
    """This process's place in the run and the collectives the loop needs. With
    ``world_size == 1`` every method returns at once without communicating, so the loop reads
    the same for one process and for many."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where the small tensors of the collectives live (CUDA for nccl)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, logs, shows progress and evaluates."""
        return self.rank == 0

    def broadcast_model(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank (one start for all, whatever the init did)."""
        if self.enabled:
            with torch.no_grad():
                for tensor in module.state_dict().values():
                    dist.broadcast(tensor, src=0)

    def average_gradients(self, module: nn.Module, done: frozenset[int] = frozenset()) -> None:
        """Replace each trainable parameter's gradient with its mean over ranks (what DDP does).

        A parameter that received no gradient on any rank keeps ``grad=None`` (AdamW then skips
        it, exactly as in a one-process run); one that received a gradient on some ranks only
        counts zero for the others. Parameters sharded by FSDP (``distributed.strategy=fsdp``) are left alone:
        FSDP reduce-scatters their gradients itself; so are those in ``done`` (averaged already by
        :class:`GradientOverlap`)."""
        if not self.enabled:
            return
        params = [p for p in module.parameters()
                  if p.requires_grad and not isinstance(p, DTensor) and id(p) not in done]
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        dist.all_reduce(has_grad)
        live = [p for p, h in zip(params, has_grad.tolist()) if h]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(live):
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            dist.all_reduce(flat)
            flat.div_(self.world_size)
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()

    def mean_over_ranks(self, values: dict[str, Any]) -> dict[str, float]:
        """The mean over ranks of named scalars (every rank passes the same names in the same order).
        For the loss: each rank's term is its share of the global-batch loss and the mean is that
        loss; NaN or inf on any rank makes the mean non-finite on every rank."""
        floats = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in values.items()}
        if not self.enabled:
            return floats
        t = torch.tensor(list(floats.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(floats, (t / self.world_size).tolist()))

    def even_shares(self, micro_batches: list[dict]) -> tuple[list[dict], int]:
        """(micro-batches to train on, samples of this step not trained on, summed over ranks).

        One process drops unreadable samples and empty micro-batches. Several processes must
        also agree on sizes, since the loss gathers equal-sized slices from every rank: each
        micro-batch is cut to the smallest number of readable samples any rank holds at that
        position (the readable samples cut off are counted with the skipped ones), and a
        micro-batch that is empty on any rank is dropped on all."""
        good = [0 if b["images"] is None else int(b["images"].shape[0]) for b in micro_batches]
        skipped = sum(int(b["skipped"]) for b in micro_batches)
        if not self.enabled:
            return [b for b, n in zip(micro_batches, good) if n], skipped
        row = torch.tensor(good + [skipped], dtype=torch.int64, device=self.device)
        table = torch.stack(self._all_gather(row))  # [world, accum + 1]
        table = table.cpu()
        shares = table[:, :-1].min(dim=0).values
        cut_off = int((table[:, :-1] - shares).sum())
        kept = [b if n == s else trim_batch(b, s) for b, n, s in zip(micro_batches, good, shares.tolist()) if s > 0]
        return kept, int(table[:, -1].sum()) + cut_off

    def rank0_decides(self, flag: bool) -> bool:
        """Rank 0's value of ``flag`` on every rank (for decisions taken on timings, which differ)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first, the others after it finished: what rank 0 stores on the
        way (rewrites, teacher embeddings) the others then find and read instead of writing."""
        if self.enabled and not self.is_main:
            dist.barrier()
        yield
        if self.enabled and self.is_main:
            dist.barrier()

    def this_rank(self, saved: Any) -> Any:
        """This rank's entry of a per-rank list saved in a checkpoint (stream positions)."""
        if not isinstance(saved, list):
            return saved  # one process's position; the stream itself checks that it fits
        if len(saved) != self.world_size:
            raise ValueError(f"the checkpoint holds the stream positions of {len(saved)} processes, this run has "
                             f"{self.world_size}; a streamed run resumes exactly only with the same number of "
                             f"processes (distributed.nproc={len(saved)} or torchrun --nproc_per_node {len(saved)})")
        return saved[self.rank]

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return out


class GradientOverlap:
    """The gradient averaging of :meth:`Dist.average_gradients`, overlapped with the backward pass: bucketed
    asynchronous all-reduces launched from gradient hooks (``register_post_accumulate_grad_hook``), as DDP's
    reducer does, but armed by the loop for the last backward of a step only (``arm`` ... ``finish``), so that
    the accumulation path and loss terms that leave parameters without gradient keep working:

    - buckets of about ``BUCKET_BYTES`` are fixed once, parameters in reverse order (the order in which backward
      produces their gradients, roughly);
    - during the armed backward, a bucket whose parameters all received their gradient is flattened and its
      all-reduce launched at once (``async_op=True``; with nccl it runs on its own stream beside the backward);
    - ``finish`` waits for the launched all-reduces, writes the means back and returns the parameters done. A
      bucket that did not fill up (a parameter without gradient in the last backward, such as ``logit_scale``
      after the first micro-batch, or ``logit_bias`` under the CLIP loss) is left to
      :meth:`Dist.average_gradients` after the backward, which agrees over ranks on which gradients exist.

    Every rank must launch the same buckets in the same order, which holds because every rank runs the same
    graph; each flattened bucket carries its index as a last element, so a rank that launched another bucket
    is caught (``RuntimeError``) instead of averaging unrelated gradients. The loop uses it with
    ``distributed.strategy=ddp`` on CUDA, or when ``distributed.overlap=true`` (how the CPU tests exercise it).
    """

    def __init__(self, dist: Dist, params: list[nn.Parameter]):
        self.dist = dist
        self.buckets = list(_buckets(list(reversed(params)), by=lambda p: p))
        self.bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.ready: list[int] = [0] * len(self.buckets)
        self.works: dict[int, tuple[Any, torch.Tensor]] = {}
        self.armed = False
        self.handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in params]

    def arm(self) -> None:
        """The next backward is the step's last: launch each bucket's all-reduce as soon as it is complete."""
        self.ready = [0] * len(self.buckets)
        self.works = {}
        self.armed = True

    def _on_gradient(self, p: nn.Parameter) -> None:
        if not self.armed:
            return
        b = self.bucket_of[id(p)]
        self.ready[b] += 1
        if self.ready[b] == len(self.buckets[b]):
            bucket = self.buckets[b]
            flat = torch.cat([*(q.grad.reshape(-1) for q in bucket),
                              torch.full((1,), b + 1, dtype=p.grad.dtype, device=p.grad.device)])
            self.works[b] = (dist.all_reduce(flat, async_op=True), flat)

    def finish(self) -> frozenset[int]:
        """Wait for the launched all-reduces, put the means in place; the ids of the parameters done."""
        self.armed = False
        done: set[int] = set()
        for b, (work, flat) in sorted(self.works.items()):
            work.wait()
            if round(float(flat[-1])) != (b + 1) * self.dist.world_size:
                raise RuntimeError(f"the ranks launched different gradient buckets (bucket {b} met another one); "
                                   "set distributed.overlap=false")
            flat.div_(self.dist.world_size)
            offset = 0
            for p in self.buckets[b]:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
                done.add(id(p))
        self.works = {}
        return frozenset(done)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _buckets(params: list[nn.Parameter], by: Callable = lambda p: p.grad) -> Iterator[list[nn.Parameter]]:
    """Parameters in order, grouped by dtype (of ``by(p)``: the gradient) into buckets of about BUCKET_BYTES."""
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(by(p).dtype, []).append(p)
    for group in by_dtype.values():
        bucket, size = [], 0
        for p in group:
            bucket.append(p)
            size += p.numel() * by(p).element_size()
            if size >= BUCKET_BYTES:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket


# ------------------------------------------------------------------ joining and leaving the group


def launched() -> bool:
    """Whether a launcher (torchrun, or :func:`launch`) started this process as one rank of a run."""
    return "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """Rank 0 of a launched run, or a process that was not launched as a rank."""
    return int(os.environ.get("RANK", "0")) == 0


def check_batch_split(batch_size: int, accum_steps: int, world_size: int) -> None:
    """``batch_size`` is the global batch: it must split into ``accum_steps`` micro-batches of
    equal slices for ``world_size`` processes."""
    parts = accum_steps * world_size
    if world_size > 1 and batch_size % parts:
        lower, upper = batch_size // parts * parts, (batch_size // parts + 1) * parts
        suggest = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(f"batch_size {batch_size} is the global batch and must split evenly over {world_size} "
                         f"processes x accum_steps {accum_steps} = {parts} slices; use batch_size {suggest}, "
                         "or change the number of processes")


def _world_from_env(nproc: int) -> tuple[int, int, int]:
    missing = [k for k in ENV_KEYS if k not in os.environ]
    endpoint = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k in missing]
    if endpoint and not set(missing) - set(endpoint):
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but no rendezvous endpoint ({' and '.join(endpoint)} "
                          "not set): with torchrun across machines pass --rdzv_endpoint HOST:PORT (the same host and "
                          "port on every node, HOST reachable from all of them); when setting the variables yourself, "
                          "export MASTER_ADDR and MASTER_PORT")
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {missing} are not: start the processes with torchrun, or unset "
                         "WORLD_SIZE and use distributed.nproc=N")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if nproc > 1 and nproc != world:
        raise ValueError(f"distributed.nproc={nproc} but the launcher started {world} processes (WORLD_SIZE={world}); "
                         "under torchrun leave distributed.nproc at 1 (or set it to the same number)")
    return rank, world, local


@contextlib.contextmanager
def process_group(nproc: int = 1, timeout_minutes: float = 30.0, backend: str = "gloo",
                  device: torch.device | None = None) -> Iterator[Dist]:
    """This process's :class:`Dist`: joins the group described by the launcher's environment
    variables (and leaves it at the end) when there are several processes; ``Dist()`` otherwise.
    ``backend``/``device`` come from the run's :class:`~clipforge.train.device.DevicePlan` (nccl and
    this rank's GPU on CUDA, gloo and the CPU otherwise). A group that the caller initialized already
    is used and left alone."""
    device = torch.device("cpu") if device is None else device
    if not launched():
        yield Dist(device=device)
        return
    rank, world, local = _world_from_env(nproc)
    if world == 1:
        yield Dist(0, 1, 0, device)
        return
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes))
    elif (dist.get_rank(), dist.get_world_size()) != (rank, world):
        raise RuntimeError(f"the initialized process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                           f"the environment says {rank} of {world}")
    try:
        yield Dist(rank, world, local, device)
    finally:
        if owned:
            dist.destroy_process_group()


def local_rank() -> int | None:
    """This process's index on its machine under a launcher (LOCAL_RANK), else None."""
    return int(os.environ["LOCAL_RANK"]) if launched() and "LOCAL_RANK" in os.environ else None


# ------------------------------------------------------------------ SLURM


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list in its compact form: ``gpu[07-09,12],cpu1`` -> ``gpu07``,
    ``node3,node4`` -> ``node3`` (what ``scontrol show hostnames | head -n 1`` prints)."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("the SLURM node list is empty")
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[:nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head[:head.index("[")], head[head.index("[") + 1:head.index("]")]
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_environment(environ: dict[str, str] | None = None, port: int = 29500) -> dict[str, str]:
    """The launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) of a process started by
    ``srun`` with several tasks, read as OpenCLIP does: the rank from SLURM_PROCID, the world size from
    SLURM_NTASKS, the local rank from SLURM_LOCALID, and the master as the first host of SLURM_JOB_NODELIST (or
    SLURM_NODELIST) unless MASTER_ADDR / MASTER_PORT are set. {} when this is not such a process, or when a
    launcher (torchrun under srun) set RANK already."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in env and not nodes:
        raise ValueError("SLURM_PROCID and SLURM_NTASKS are set but neither MASTER_ADDR nor SLURM_JOB_NODELIST: "
                         "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) in the "
                         "sbatch script")
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes),
            "MASTER_PORT": env.get("MASTER_PORT", str(port))}


def adopt_slurm_environment() -> bool:
    """Under ``srun`` with several tasks (and no torchrun), set the launcher variables from SLURM's
    (:func:`slurm_environment`) so that :func:`process_group` joins the run; whether it did."""
    found = slurm_environment()
    os.environ.update(found)
    return bool(found)


# ------------------------------------------------------------------ starting the processes ourselves


class DistributedRunStopped(ClipforgeError, RuntimeError):
    """Another process of the run died, or did not answer within ``distributed.timeout_minutes``; this one stops
    too (instead of waiting forever) and names the checkpoint to resume from."""


# what torch.distributed raises when a peer is gone (gloo: the connection closed) or silent past the timeout
PEER_LOST = (dist.DistError,)
PEER_LOST_TEXT = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe",
                  "Socket Timeout", "ProcessGroupGloo")


def peer_lost(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank is gone or silent."""
    return isinstance(error, PEER_LOST) or (isinstance(error, RuntimeError) and any(
        t in str(error) for t in PEER_LOST_TEXT))


class RemoteTraceback(Exception):
    """The traceback of an error raised in another process (attached as the re-raised error's cause)."""

    def __str__(self) -> str:
        return self.args[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(fn: Callable, args: tuple, rank: int, world: int, port: int, threads: int, conn) -> None:
    """Body of one started process: the launcher's environment, then ``fn(*args)``; the result
    (rank 0's) or the error goes back through ``conn``."""
    import faulthandler  # imported here, not at the top: see clipforge/train/exit_signals.py

    faulthandler.enable(all_threads=True)  # a crash in native code (SIGSEGV, SIGABRT) prints where Python was
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        result = fn(*args)
        conn.send(("ok", result if rank == 0 else None))
    except BaseException as e:  # noqa: BLE001  (reported to the parent, which re-raises it)
        tb = traceback.format_exc()
        try:
            err = pickle.loads(pickle.dumps(e))  # the round trip: some exception classes pickle but do not unpickle
        except Exception:  # noqa: BLE001  (an exception that cannot travel: send its text)
            err = RuntimeError(f"{type(e).__name__}: {e}")
        conn.send(("error", err, tb))
        raise SystemExit(1) from None
    finally:
        conn.close()


def launch(fn: Callable, nproc: int, *args) -> Any:
    """Run ``fn(*args)`` in ``nproc`` new local processes that form one gloo group (the
    environment torchrun would give them, on a free port of 127.0.0.1) and return rank 0's
    result. When a process fails, the others get ``GRACE_SECONDS`` to report (a consistent stop,
    such as a diverged loss, reaches every rank at once) and are then stopped; the first error
    reported is raised here, with the process's traceback as its cause. Called inside
    :func:`~clipforge.models.onednn_linear.onednn_fp32_linears`, every process runs ``fn`` inside it too (a
    TorchFunctionMode does not cross into a new process by itself)."""
    from ..models.onednn_linear import call_with_onednn_linears, onednn_linears_active  # only launches need it

    if onednn_linears_active():
        fn, args = call_with_onednn_linears, (fn, *args)
    try:
        pickle.dumps((fn, args))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"distributed.nproc={nproc} starts new processes, which receive their arguments by pickling, "
                         f"and these cannot be pickled ({e}); pass module-level functions (or functools.partial) "
                         "instead of lambdas, or start the processes with torchrun") from None
    ctx = torch.multiprocessing.get_context("spawn")
    port, threads = free_port(), max(1, torch.get_num_threads() // nproc)
    pipes = [ctx.Pipe(duplex=False) for _ in range(nproc)]
    procs = [ctx.Process(target=_run_rank, args=(fn, args, rank, nproc, port, threads, pipes[rank][1]),
                         name=f"clipforge-rank{rank}") for rank in range(nproc)]
    for p, (_, send_end) in zip(procs, pipes):
        p.start()
        send_end.close()  # the child holds its own copy; ours would keep the pipe open after the child exits
    replies: dict[int, tuple] = {}
    failures: list[tuple[int, BaseException, str]] = []
    first_failure = math.inf
    try:
        waiting = {rank: recv_end for rank, (recv_end, _) in enumerate(pipes)}
        while waiting and time.monotonic() < first_failure + GRACE_SECONDS:
            ready = multiprocessing.connection.wait(list(waiting.values()), timeout=1.0)
            for rank in [r for r, c in waiting.items() if c in ready]:
                try:
                    replies[rank] = waiting.pop(rank).recv()
                except EOFError:  # the process ended without a word (killed, crashed)
                    procs[rank].join(5)
                    from .exit_signals import silent_exit_message

                    replies[rank] = ("error", RuntimeError(silent_exit_message(rank, nproc, procs[rank].exitcode)),
                                     "")
                if replies[rank][0] == "error":
                    failures.append((rank, replies[rank][1], replies[rank][2]))
                    first_failure = min(first_failure, time.monotonic())
    finally:
        for p in procs:
            p.join(timeout=0 if failures else 30)
            if p.is_alive():
                p.terminate()
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()
    if failures:
        rank, err, tb = failures[0]
        raise err from RemoteTraceback(f"\n(in process {rank} of {nproc})\n{tb}")
    return replies[0][1]
