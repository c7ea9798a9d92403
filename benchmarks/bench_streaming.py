"""Streaming loader throughput on the built openclipart shards, next to the map-style loader.

Images are read from the train shards, decoded and passed through the training transform
(random resized crop + color jitter) at 64 and 224 px in ``--workers`` DataLoader workers, in
batches of 64; images per second are measured over ``--images`` images after one warm-up
batch. ``streaming``: :class:`clipforge.data.streaming.StreamingLoader` (shuffle buffer of
``--buffer`` records, endless epochs); ``map-style``: ``ShardDataset`` + ``DataLoader`` as in
``bench_data.py``, run in the same process for a comparison under the same machine load.

    python benchmarks/bench_streaming.py [--root ~/.cache/clipforge/data/openclipart] [--workers 2] \
        [--images 2048] [--buffer 1000] [--repeats 1]
"""
from __future__ import annotations

import argparse
import time


def bench_streaming(root: str, size: int, workers: int, images: int, buffer: int, batch: int = 64) -> tuple[int, float]:
    from clipforge.data.streaming import StreamingLoader, StreamingShards

    ds = StreamingShards(root, split="train", image_size=size, augment=True, shuffle_buffer=buffer, seed=0, epochs=None)
    loader = StreamingLoader(ds, batch_size=batch, num_workers=workers)
    it = iter(loader)
    next(it)  # workers started, buffers filled, first batch done
    t0 = time.perf_counter()
    n = 0
    for b in it:
        n += b["samples"]
        if n >= images:
            break
    dt = time.perf_counter() - t0
    del it
    return n, n / dt


def main() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_data import bench_loader

    from clipforge.cli.common import table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="openclipart shard directory (default: the data home)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--buffer", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--skip-map", action="store_true", help="only the streaming loader")
    args = p.parse_args()
    from corpus_setup import ensure_corpus

    root = ensure_corpus("openclipart", args.root)
    rows = []
    for _ in range(args.repeats):
        maps = (
            {} if args.skip_map else {int(r[0].split()[0]): r[3] for r in bench_loader(root, args.workers, args.images)}
        )
        for size in (64, 224):
            n, ips = bench_streaming(root, size, args.workers, args.images, args.buffer)
            rows.append([f"{size} px", args.workers, n, f"{ips:,.0f}", maps.get(size, "-")])
    print(f"### Streaming loader: openclipart train shards, decode + train augmentation, {args.workers} workers, "
          f"shuffle buffer {args.buffer}\n")
    print(table(rows, ["size", "workers", "images", "streaming images/s", "map-style images/s"]))


if __name__ == "__main__":
    main()
