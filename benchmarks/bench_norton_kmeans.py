"""CPU cost of the heavier clustering and transport loss terms: Norton's token-level transport (B^2 N L
similarities, Sinkhorn iterations) forward + backward, and the k-means that ProtoCLIP runs
once per episode.

    python benchmarks/bench_norton_kmeans.py --threads 1
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from clipforge.losses import NortonConfig, kmeans, norton_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--units", type=int, default=49)  # 7 x 7 patches
    parser.add_argument("--words", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for b in args.batches:
        units = F.normalize(torch.randn(b, args.units, args.dim), dim=-1).requires_grad_()
        words = F.normalize(torch.randn(b, args.words, args.dim), dim=-1).requires_grad_()
        start = time.perf_counter()
        norton_loss(units, words, 14.3, None, NortonConfig()).backward()
        print(f"norton  B={b} N={args.units} L={args.words} d={args.dim} iters=50: "
              f"{time.perf_counter() - start:.2f} s forward+backward")
    memory = F.normalize(torch.randn(4096, 512), dim=-1)
    start = time.perf_counter()
    kmeans(memory, 64, iters=20)
    print(f"kmeans  4096 x 512, K=64, 20 iterations (one ProtoCLIP episode, per modality): "
          f"{time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
