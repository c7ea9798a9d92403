"""Embedding a folder of images: ``clipforge embed`` in one process against ``--engine ray`` (a Ray Data
actor pool), images/s side by side, alternating.

    nice python benchmarks/bench_embed_engines.py --images 3000 --blocks 6

The images are ``shapes`` scenes (PNG, ``--size`` px) rendered once into ``--dir`` (default
/tmp/clipforge-bench-embed-N); the model is a randomly initialized ``--model`` (default ``tiny``)
saved beside them, so both engines load it from disk as the command line does. One local Ray
instance (``--ray-cpus`` CPUs) is started once; its start-up time is printed apart. The N images are
split into ``--blocks`` blocks; each arm embeds every block, the arm that goes first alternating
from block to block:

- ``local``: :func:`clipforge.serve.embed.embed_local` in this process with ``--local-threads`` torch
  threads (default: every CPU), the model loaded once, outside the timing.
- ``ray``: :func:`clipforge.serve.ray_embed.embed_ray` on the running Ray instance with ``--actors``
  actors of one CPU and one torch thread each, into a fresh work directory; the timing is a whole
  call, as a user runs it: the driver's weight hash, the actors' start-up (imports, loading the
  model once each), decoding, encoding and writing the blocks, and reading them back in order.
  Its two parts are printed too: ``ray start-up s``, from starting the pipeline until the first
  actor had loaded its model, and ``ray after start-up img/s``, the block's images over the time
  from then until the last result was back (a lower bound on the pool's running rate: the second
  actor may start later than the first).

Every block also checks that the two arms' embeddings agree (largest absolute difference). The
script prints every block, the median images/s of each arm with its range, the median per-block
ratio, and the load average before, during and after: on a shared machine the load changes over
minutes, so read the per-block ratios, measured seconds apart.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(root: Path, n: int, size: int) -> Path:
    """``n`` shapes scenes as PNGs in ``root`` (reused when present)."""
    from clipforge.data.shapes import ShapesGenerator

    done = root / f".done-{n}-{size}"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    gen = ShapesGenerator("val", seed=0, image_size=size)
    for i in range(n):
        Image.fromarray(gen.sample(i).image).save(root / f"{i:06d}.png")
    done.write_text("ok")
    return root


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):,.2f} (range {min(xs):,.2f} - {max(xs):,.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000, help="images in all (default 3000)")
    ap.add_argument("--blocks", type=int, default=6, help="alternating blocks (default 6)")
    ap.add_argument("--size", type=int, default=96, help="image side in px, before the model's resize (default 96)")
    ap.add_argument("--model", default="tiny", help="model config, random weights (default tiny)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--actors", type=int, default=2, help="Ray actors, one CPU and one thread each (default 2)")
    ap.add_argument("--ray-cpus", type=int, default=0, help="CPUs of the local Ray (default: every CPU)")
    ap.add_argument("--local-threads", type=int, default=0, help="torch threads of the local arm (default: CPUs)")
    ap.add_argument("--dir", help="where the images go (default /tmp/clipforge-bench-embed-N)")
    args = ap.parse_args()
    if args.blocks < 1 or args.images < args.blocks:
        ap.error(f"--images ({args.images}) must be at least --blocks ({args.blocks}) >= 1")

    import ray

    import clipforge
    from clipforge.cli.common import table
    from clipforge.models import save_model
    from clipforge.serve.embed import Collection, collect_images, embed_local
    from clipforge.serve.ray_embed import ModelLoader, embed_ray

    cpus = os.cpu_count() or 1
    load_before = os.getloadavg()
    root = make_images(Path(args.dir or f"/tmp/clipforge-bench-embed-{args.images}"), args.images, args.size)
    model_dir = root.parent / f"{root.name}-model-{args.model}"
    if not (model_dir / "model_config.json").exists():
        save_model(clipforge.create_model(args.model, seed=0), model_dir)
    loader = ModelLoader(str(model_dir))
    model, transform = loader()
    torch.set_num_threads(args.local_threads or cpus)
    col = collect_images([str(root)])
    t0 = time.perf_counter()
    ray.init(num_cpus=args.ray_cpus or cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    ray_init_s = time.perf_counter() - t0
    work_root = Path(tempfile.mkdtemp(prefix="bench-embed-work-"))
    edges = [round(b * len(col) / args.blocks) for b in range(args.blocks + 1)]
    rows, local_all, ray_all, ratios, loads, steady, startup = [], [], [], [], [], [], []
    try:
        for b in range(args.blocks):
            block = Collection(col.keys[edges[b]:edges[b + 1]], col.refs[edges[b]:edges[b + 1]])
            rates, outs = {}, {}
            for arm in (("local", "ray") if b % 2 == 0 else ("ray", "local")):
                t0 = time.perf_counter()
                if arm == "local":
                    outs[arm] = embed_local(model, transform, block, args.batch_size, progress=False).embeddings
                else:
                    res = embed_ray(loader, block, work_root / f"block{b}", source=str(model_dir), block_size=1024,
                                    batch_size=args.batch_size, actors=args.actors, progress=False)
                    outs[arm] = res.embeddings
                    startup.append(res.timings["startup"])
                    steady.append(res.timings["images"] / max(res.timings["streaming"], 1e-9))
                rates[arm] = len(block) / (time.perf_counter() - t0)
            diff = float(np.abs(outs["local"] - outs["ray"]).max())
            load = os.getloadavg()[0]
            local_all.append(rates["local"])
            ray_all.append(rates["ray"])
            ratios.append(rates["ray"] / rates["local"])
            loads.append(load)
            rows.append([str(b), "local, ray" if b % 2 == 0 else "ray, local", str(len(block)),
                         f"{rates['local']:,.1f}", f"{rates['ray']:,.1f}", f"{rates['ray'] / rates['local']:.3f}",
                         f"{startup[-1]:.1f}", f"{steady[-1]:,.1f}", f"{diff:.1e}", f"{load:.2f}"])
            print("block " + " | ".join(rows[-1]), flush=True)  # what a stopped run has measured so far
    finally:
        ray.shutdown()
        shutil.rmtree(work_root, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"### {args.model} ({model.image_size} px input), {len(col)} shapes PNGs of {args.size} px in "
          f"{args.blocks} alternating blocks, batch {args.batch_size}, {cpus} CPUs: local = one process, "
          f"{torch.get_num_threads()} torch threads; ray = {args.actors} actors x 1 CPU/1 thread on a local Ray of "
          f"{args.ray_cpus or cpus} CPUs (ray {ray.__version__})\n")
    print(table(rows, ["block", "order", "images", "local img/s", "ray img/s", "ray / local", "ray start-up s",
                       "ray after start-up img/s", "max |diff|", "load avg (1 min)"]))
    print(f"\nimages/s: local {spread(local_all)}; ray {spread(ray_all)}")
    print(f"ray / local per block: {spread(ratios)}")
    print(f"ray after start-up (first actor's model loaded): {spread(steady)} images/s; start-up {spread(startup)} s")
    print(f"Ray start-up (ray.init, once, not in the blocks): {ray_init_s:.1f} s")
    print(f"load average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}; after "
          f"{', '.join(f'{x:.2f}' for x in load_after)}; during (1 min, after each block) {min(loads):.2f} - "
          f"{max(loads):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
