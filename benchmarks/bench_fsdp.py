"""distributed.strategy=fsdp on CPU: memory per rank, activation memory with grad_checkpointing, throughput.

    python benchmarks/bench_fsdp.py memory       # param + grad + AdamW bytes per rank, 1 and 2 processes
    python benchmarks/bench_fsdp.py activations  # activations kept for backward, with and without grad_checkpointing
    python benchmarks/bench_fsdp.py throughput [--repeats 3 --steps 12 --batch 128]

memory: for each model the towers are sharded exactly as training shards them (:func:`clipforge.train.fsdp.
shard_model`, FSDP2 over a 2-process gloo group). ViT-B-16 and ViT-L-14 are built on the meta device (no
memory) and their bytes are counted from the shapes of each rank's shards: parameters, gradients (the same
shapes as the sharded parameters) and AdamW's two moments (fp32; the per-parameter step counters, a few bytes
each, are left out). ViT-B-32 is also trained for one real step (batch 2) and its bytes are counted from the
real tensors (``p.grad`` and ``optimizer.state`` after the step, each rank's local shards), which checks the
shape count. One process with strategy=fsdp does not shard: its row is the whole model.

activations: the bytes of the distinct tensors autograd keeps for backward at the end of one training forward
(``torch.autograd.graph.saved_tensors_hooks``; with non-reentrant checkpointing only each block's input is kept
and the block is recomputed in backward, one block at a time), batch 64, fp32. A smaller model than ViT-B so that
the run fits in the shared machine's memory: image 112 px / patch 16 / width 384 / 6 layers, text 77 tokens /
width 256 / 6 layers.

throughput: ``clipforge.train.train`` on the ``tiny`` model (bench_distributed.py's setup), 1 process x 2
threads against 2 processes x 1 thread under ddp and fsdp; the arms alternate, each run in a fresh process;
the median over steps (after the first 3) of the logged samples/s, then the median (min-max) over repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 3
GIB = 2**30


# ------------------------------------------------------------------ memory


def _count(model, optimizer=None) -> dict:
    """Bytes on this rank: parameters, gradients, optimizer state (real tensors when ``optimizer`` has stepped,
    else from the shapes of the trainable parameters: grad = param, AdamW = 2 x param)."""
    from clipforge.train.fsdp import local

    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    trainable = sum(local(p).numel() * local(p).element_size() for p in model.parameters() if p.requires_grad)
    if optimizer is None:
        return {"params": params, "grads": trainable, "optimizer": 2 * trainable, "how": "shapes"}
    grads = sum(local(p.grad).numel() * local(p.grad).element_size() for p in model.parameters() if p.grad is not None)
    state = sum(local(t).numel() * local(t).element_size() for s in optimizer.state.values() for k, t in s.items()
                if k != "step")
    return {"params": params, "grads": grads, "optimizer": state, "how": "real tensors"}


def _memory_rank(name: str, real: bool) -> dict:
    """In one of the started processes (or the only one): build, shard when there are 2 ranks, count."""
    import torch

    from clipforge.models import create_model
    from clipforge.train.distributed import process_group
    from clipforge.train.fsdp import shard_model
    from clipforge.train.optim import build_optimizer

    with process_group(int(os.environ.get("WORLD_SIZE", "1"))) as dist:
        if real:
            model = create_model(name, seed=0)
        else:
            with torch.device("meta"):
                model = create_model(name, seed=0)
        if dist.enabled:
            shard_model(model, torch.device("cpu"), dist.world_size, "fp32")
        if not real:
            return _count(model)
        optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.98), 1e-6)
        images = torch.rand(2 // dist.world_size, 3, model.image_size, model.image_size)
        texts = torch.randint(1, 1000, (2 // dist.world_size, model.context_length))
        out = model(images, texts)
        (out["image_features"] @ out["text_features"].T).sum().backward()
        dist.average_gradients(model)
        optimizer.step()
        return _count(model, optimizer)


def memory() -> None:
    from clipforge.train.distributed import launch

    rows = []
    for name, real in (("ViT-B-32", True), ("ViT-B-32", False), ("ViT-B-16", False), ("ViT-L-14", False)):
        one = _memory_rank(name, real)
        two = launch(_memory_rank, 2, name, real)  # rank 0's count; the ranks' shards differ by at most a row each
        total1 = one["params"] + one["grads"] + one["optimizer"]
        total2 = two["params"] + two["grads"] + two["optimizer"]
        rows.append(f"| {name} | {one['how']} | {total1 / GIB:.3f} | {total2 / GIB:.3f} | {total2 / total1:.1%} |")
    print("| model | counted from | 1 process: param+grad+AdamW GiB | 2 processes, per rank | ratio |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


# ------------------------------------------------------------------ activations


def activations() -> None:
    import torch

    from clipforge.models import create_model

    torch.manual_seed(0)
    rows = []
    for checkpointing in (False, True):
        model = create_model("tiny", seed=0, embed_dim=256,
                             vision={"image_size": 112, "patch_size": 16, "width": 384, "layers": 6, "heads": 6},
                             text={"context_length": 77, "width": 256, "layers": 6, "heads": 4}).train()
        model.set_grad_checkpointing(checkpointing)
        images, texts = torch.rand(64, 3, 112, 112), torch.randint(1, 1000, (64, 77))
        kept: dict[int, int] = {}

        def pack(t, kept=kept):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(images, texts)
        loss = (out["image_features"] @ out["text_features"].T).logsumexp(-1).mean()
        loss.backward()
        rows.append((checkpointing, sum(kept.values()), time.perf_counter() - t0))
    base = rows[0][1]
    print("| grad_checkpointing | activations kept for backward (MiB) | reduction | forward+backward s |")
    print("|---|---|---|---|")
    for checkpointing, nbytes, seconds in rows:
        print(f"| {checkpointing} | {nbytes / 2**20:.1f} | {base / nbytes:.1f}x | {seconds:.2f} |")


# ------------------------------------------------------------------ throughput


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from clipforge.train import DataConfig, DistributedConfig, TrainConfig, train

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model="tiny", data=DataConfig(train_size=max(2048, args.batch * 4), eval_size=32),
                          batch_size=args.batch, steps=args.steps, warmup_steps=2, save_every=0, log_every=1,
                          out_dir=out, progress=False, precision="fp32",
                          distributed=DistributedConfig(nproc=args.nproc, strategy=args.strategy))
        train(cfg)
        per_step = [r["samples_per_second"] for r in map(json.loads, open(Path(out) / "metrics.jsonl")) if "loss" in r]
    print(json.dumps({"sps": statistics.median(per_step[WARMUP_STEPS:])}))


def throughput(args) -> None:
    arms = [("1 process x 2 threads", 1, 2, "ddp"), ("2 processes x 1 thread, ddp", 2, 2, "ddp"),
            ("2 processes x 1 thread, fsdp", 2, 2, "fsdp")]
    results: dict[str, list[float]] = {label: [] for label, *_ in arms}
    for _ in range(args.repeats):
        for label, nproc, threads, strategy in arms:  # alternating
            cmd = [sys.executable, __file__, "child", "--nproc", str(nproc), "--threads", str(threads), "--strategy",
                   strategy, "--batch", str(args.batch), "--steps", str(args.steps)]
            env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(threads))
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            results[label].append(json.loads(out.strip().splitlines()[-1])["sps"])
            print(f"# {label}: {results[label][-1]:.1f} samples/s", flush=True)  # kept if the run is cut short
    base = statistics.median(results[arms[0][0]])
    print(f"| arm (tiny model, batch {args.batch}, fp32) | samples/s median (min-max) | ratio to 1 x 2 threads |")
    print("|---|---|---|")
    for label, values in results.items():
        med = statistics.median(values)
        print(f"| {label} | {med:.0f} ({min(values):.0f}-{max(values):.0f}) | {med / base:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["memory", "activations", "throughput", "child"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--strategy", default="ddp")
    args = p.parse_args()
    if args.what == "memory":
        memory()
    elif args.what == "activations":
        activations()
    elif args.what == "throughput":
        throughput(args)
    else:
        child(args)


if __name__ == "__main__":
    main()
