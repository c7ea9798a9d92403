"""Fidelity (a): SigLIP versus CLIP at a small batch.

Zhai et al. ("Sigmoid Loss for Language Image Pre-Training", 2023) report that the sigmoid
loss beats the softmax (InfoNCE) loss at small batch sizes. Both arms train `tiny` on
`shapes` with the same seed, data order, batch (32 by default) and steps; SigLIP starts from
its paper's initialization (t = 10, b = -10).

    python benchmarks/fidelity_siglip.py [--steps 800] [--batch 32] [--seeds 0 1]
"""
from __future__ import annotations

import math

from fidelity_common import parser, print_table, run_arms, shapes_metrics

ARMS = [("clip", {"clip": 1.0}, {}),
        ("siglip", {"siglip": 1.0}, {"init_logit_bias": -10.0, "init_logit_scale": math.log(10.0)})]
COLUMNS = [("object_top1", "compositional object top-1"), ("shape_top1", "shape top-1"), ("color_top1", "color top-1"),
           ("count_top1", "count top-1"), ("i2t_R@1", "val i2t R@1"), ("t2i_R@1", "val t2i R@1"), ("train_s", "train s")]


def main():
    args = parser(__doc__, steps=800, batch=32).parse_args()
    rows = run_arms(ARMS, args, shapes_metrics)
    print_table(f"SigLIP vs CLIP, batch {args.batch}", rows, COLUMNS, args)


if __name__ == "__main__":
    main()
