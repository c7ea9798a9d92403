"""Is the evaluation data path the bottleneck? Encoding N images at 224 px with ViT-B-32 through
``clipforge eval``'s data path (an ``imagefolder:`` spec read by
:func:`clipforge.evaluation.datasets.load_eval_data`, decoded, resized, cropped and normalized in
DataLoader workers by :func:`clipforge.evaluation.loader.encode_refs`) against the bare model
forward on pre-decoded, pre-normalized tensors, side by side in one process.

    nice python benchmarks/bench_eval_data_path.py --images 20000 --blocks 10   # the issue's size
    nice python benchmarks/bench_eval_data_path.py --images 640 --blocks 10     # what a shared 2-core machine allows

The images are random-content JPEGs of 256 x 256 px (quality 90) written once to
``--dir`` (default /tmp/clipforge-bench-eval-N), so the data path decodes, resizes to 224 and
center-crops each one, as it would a user's photos. The N images are split into ``--blocks``
blocks; in each block both arms encode the same number of images back to back, and the arm that
goes first alternates from block to block (bare, data | data, bare | ...). On a shared machine the
load changes over minutes, so the per-block ratio (data path images/s over bare forward images/s,
measured seconds apart) is the number to read: the script prints every block, the median ratio, its
range and interquartile range, and the load average before, during and after. The data path
encodes each image once (block b takes its own slice of the N images, with a fresh DataLoader, as
``clipforge eval`` makes one per dataset); the bare forward cycles a pool of ``--pool``
pre-decoded images (its cost does not depend on the pixel values; holding 20,000 decoded images
would take 3 GB). The content fingerprint the embedding cache keys on (SHA-256 of every file, once
per run of ``clipforge eval``) is timed separately. Run it with ``nice`` on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(root: Path, n: int, size: int = 256, classes: int = 10) -> Path:
    """``n`` random-content JPEGs in ``classes`` class folders (reused when present)."""
    done = root / f".done-{n}"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth random content (upsampled noise): compresses like a photo, unlike white noise
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i:06d}.jpg", quality=90)
    done.write_text("ok")
    return root


@torch.no_grad()
def bare_forward(model, pool: torch.Tensor, n: int, batch_size: int, precision: str, start: int = 0) -> float:
    """Images/s of ``model.encode_image`` alone on ``n`` images cycled from the pre-normalized ``pool``."""
    from clipforge.evaluation.loader import autocast

    t0 = time.perf_counter()
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        idx = torch.arange(start + done, start + done + b) % len(pool)
        with autocast(precision):
            model.encode_image(pool[idx]).float()
        done += b
    return n / (time.perf_counter() - t0)


def data_path(model, refs, batch_size: int, workers: int, precision: str) -> float:
    from clipforge.evaluation.loader import encode_refs

    t0 = time.perf_counter()
    feats = encode_refs(model, refs, batch_size=batch_size, workers=workers, precision=precision, progress=False)
    elapsed = time.perf_counter() - t0
    assert not torch.isnan(feats).any(), "an image failed to decode"
    return len(refs) / elapsed


def cpu_costs(model, refs, transform, n: int, batch_size: int, precision: str) -> tuple[float, float]:
    """CPU seconds per image (``time.process_time``, this process, one thread) of decoding + preprocessing and of the
    forward, on ``n`` images. CPU time hardly depends on what else the machine runs, unlike images/s."""
    from clipforge.evaluation.loader import RefImages

    ds = RefImages(refs[:n], transform, model.image_size)
    t0 = time.process_time()
    pixels = torch.stack([ds[i][0] for i in range(len(ds))])
    decode = (time.process_time() - t0) / len(ds)
    t0 = time.process_time()
    bare_forward(model, pixels, len(ds), batch_size, precision)
    forward = (time.process_time() - t0) / len(ds)
    return decode, forward


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20_000, help="images each arm encodes in all (default 20000)")
    ap.add_argument("--blocks", type=int, default=10,
                    help="alternating blocks the images are split into (default 10; 0: only the CPU-time check)")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the data path (default 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="default bf16 (autocast)")
    ap.add_argument("--pool", type=int, default=256, help="pre-decoded images the bare forward cycles (default 256)")
    ap.add_argument("--dir", help="where the JPEGs are written (default /tmp/clipforge-bench-eval-N)")
    ap.add_argument("--cpu-images", type=int, default=64,
                    help="images for the CPU-time check of decode vs forward, one thread (default 64; 0: skip)")
    args = ap.parse_args()
    if args.blocks < 0 or args.images < args.blocks or (args.blocks == 0 and not args.cpu_images):
        ap.error(f"--images ({args.images}) must be at least --blocks ({args.blocks}); --blocks 0 needs --cpu-images")

    import clipforge
    from clipforge.cli.common import table
    from clipforge.evaluation.datasets import load_eval_data
    from clipforge.transforms import EvalTransform

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    root = make_images(Path(args.dir or f"/tmp/clipforge-bench-eval-{args.images}"), args.images)
    t0 = time.perf_counter()
    data = load_eval_data(f"imagefolder:{root}")
    index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    data.test.fingerprint()
    hash_s = time.perf_counter() - t0
    refs = data.test.refs
    model = clipforge.create_model(args.model).eval()
    transform = EvalTransform(model.image_size)
    pool = torch.stack([transform(Image.open(r.path).convert("RGB")) for r in refs[: min(args.pool, len(refs))]])

    warm = min(len(refs), args.batch_size)
    if args.blocks:
        data_path(model, refs[:warm], args.batch_size, args.workers, args.precision)  # warm-up, both arms
        bare_forward(model, pool, warm, args.batch_size, args.precision)
    edges = [round(b * len(refs) / args.blocks) for b in range(args.blocks + 1)] if args.blocks else []
    rows, ratios, bare_all, data_all, loads = [], [], [], [], []
    for b in range(args.blocks):
        block = refs[edges[b]:edges[b + 1]]
        if b % 2 == 0:
            bare = bare_forward(model, pool, len(block), args.batch_size, args.precision, start=edges[b])
            streamed = data_path(model, block, args.batch_size, args.workers, args.precision)
        else:
            streamed = data_path(model, block, args.batch_size, args.workers, args.precision)
            bare = bare_forward(model, pool, len(block), args.batch_size, args.precision, start=edges[b])
        load = os.getloadavg()[0]
        ratios.append(streamed / bare)
        bare_all.append(bare)
        data_all.append(streamed)
        loads.append(load)
        rows.append([str(b), "bare, data" if b % 2 == 0 else "data, bare", str(len(block)), f"{bare:,.2f}",
                     f"{streamed:,.2f}", f"{streamed / bare:.3f}", f"{load:.2f}"])
    load_after = os.getloadavg()
    costs = None
    if args.cpu_images:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        costs = cpu_costs(model, refs, transform, min(args.cpu_images, len(refs)), args.batch_size, args.precision)
        torch.set_num_threads(threads)

    if rows:
        print(f"### {args.model}, {len(refs)} images at {model.image_size} px in {args.blocks} alternating blocks, "
              f"batch {args.batch_size}, {args.precision}, {torch.get_num_threads()} torch threads, {args.workers} "
              f"workers, {os.cpu_count()} CPUs\n")
        print(table(rows, ["block", "order", "images", "bare forward img/s", "data path img/s", "data / bare",
                           "load avg (1 min)"]))
        q1, q3 = quartiles(ratios)
        print(f"\ndata path / bare forward, per block: median {statistics.median(ratios):.3f}, range "
              f"{min(ratios):.3f} - {max(ratios):.3f}, interquartile {q1:.3f} - {q3:.3f}  (the issue's bar: >= 0.90)")
        print(f"median images/s: bare forward {statistics.median(bare_all):,.2f}, data path "
              f"{statistics.median(data_all):,.2f}")
    during = f"; during (1 min, after each block) {min(loads):.2f} - {max(loads):.2f}" if loads else ""
    print(f"load average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}; after "
          f"{', '.join(f'{x:.2f}' for x in load_after)}{during}")
    if costs is not None:
        decode, forward = costs
        print(f"CPU time per image, one thread ({min(args.cpu_images, len(refs))} images): decode + resize + crop + "
              f"normalize {1000 * decode:.1f} ms, forward {1000 * forward:.1f} ms; with no overlap at all "
              f"(--workers 0) the data path would reach {forward / (decode + forward):.3f} of the bare forward")
    print(f"indexing the folder: {index_s:.2f} s; content fingerprint (SHA-256 of every file): {hash_s:.2f} s "
          f"({len(refs) / max(hash_s, 1e-9):,.0f} files/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
