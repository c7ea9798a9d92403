"""Is the evaluation data path the bottleneck? Encoding N images at 224 px with ViT-B-32 through
``clipforge eval``'s data path (an ``imagefolder:`` spec read by
:func:`clipforge.evaluation.datasets.load_eval_data`, decoded, resized, cropped and normalized in
DataLoader workers by :func:`clipforge.evaluation.loader.encode_refs`) against the bare model
forward on pre-decoded, pre-normalized tensors, side by side in one process.

    nice python benchmarks/bench_eval_data_path.py --images 20000            # the issue's measurement
    nice python benchmarks/bench_eval_data_path.py --images 256 --repeats 3  # a quick check

The images are random-content JPEGs of 256 x 256 px (quality 90) written once to
``--dir`` (default /tmp/clipforge-bench-eval-N), so the data path decodes, resizes to 224 and
center-crops each one, as it would a user's photos. The bare forward cycles a pool of
``--pool`` pre-decoded images (the forward's cost does not depend on the pixel values; holding
20,000 decoded images would take 3 GB). The two runs alternate (bare, data, bare, data, ...)
and the table gives the median and the range of images/s over ``--repeats`` runs of each, and
the ratio of the medians. The content fingerprint the embedding cache keys on (SHA-256 of every
file, once per run of ``clipforge eval``) is timed separately. Run it with ``nice`` on a shared machine.
"""
from __future__ import annotations

import argparse
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
def bare_forward(model, pool: torch.Tensor, n: int, batch_size: int, precision: str) -> float:
    """Images/s of ``model.encode_image`` alone on ``n`` images cycled from the pre-normalized ``pool``."""
    from clipforge.evaluation.loader import autocast

    t0 = time.perf_counter()
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        idx = torch.arange(done, done + b) % len(pool)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20_000, help="images to encode per run (default 20000)")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the data path (default 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each path, alternating (default 3)")
    ap.add_argument("--pool", type=int, default=256, help="pre-decoded images the bare forward cycles (default 256)")
    ap.add_argument("--dir", help="where the JPEGs are written (default /tmp/clipforge-bench-eval-N)")
    args = ap.parse_args()

    import clipforge
    from clipforge.cli.common import table
    from clipforge.evaluation.datasets import load_eval_data
    from clipforge.transforms import EvalTransform

    if args.threads:
        torch.set_num_threads(args.threads)
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

    bare, streamed = [], []
    data_path(model, refs[: 2 * args.batch_size], args.batch_size, args.workers, args.precision)  # warm-up
    for _ in range(args.repeats):
        bare.append(bare_forward(model, pool, len(refs), args.batch_size, args.precision))
        streamed.append(data_path(model, refs, args.batch_size, args.workers, args.precision))

    def row(name, xs):
        return [name, f"{statistics.median(xs):,.1f}", f"{min(xs):,.1f} - {max(xs):,.1f}"]

    print(f"### {args.model}, {len(refs)} images at {model.image_size} px, batch {args.batch_size}, {args.precision}, "
          f"{torch.get_num_threads()} torch threads, {args.workers} workers, {args.repeats} alternating runs each\n")
    print(table([row("bare model forward (pre-decoded tensors)", bare),
                 row("clipforge eval data path (decode in workers + forward)", streamed)],
                ["path", "median images/s", "range"]))
    ratio = statistics.median(streamed) / statistics.median(bare)
    print(f"\ndata path / bare forward (medians): {ratio:.3f}  (the issue's bar: >= 0.90)")
    print(f"indexing the folder: {index_s:.2f} s; content fingerprint (SHA-256 of every file): {hash_s:.2f} s "
          f"({len(refs) / max(hash_s, 1e-9):,.0f} files/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
