"""Fidelity (c): the counting loss raises counting accuracy.

Paiss et al. ("Teaching CLIP to Count to Ten", 2023) add a loss that prefers the true-count
caption over a counterfactual one with a wrong number, and report better counting. Both arms
train `tiny` on `shapes` identically except for the loss (the counting arm also receives one
counterfactual count caption per counted training sample). Measured on the held-out
`counting` split (groups of 1-4 identical objects):

- CountBench-style choice: each image picks among the four captions "N <color> <shape>s."
  that differ only in the number (clipforge.evaluation.compositionality.count_choice_accuracy,
  chance 0.25);
- zero-shot classification of the count with generic prompts ("three shapes.").

    python benchmarks/fidelity_counting.py [--steps 250] [--batch 128] [--seeds 0 1] [--weight 1.0]
"""
from __future__ import annotations

import torch
from fidelity_common import parser, print_table, run_arms, shapes_metrics, split_features

from clipforge.evaluation import encode_texts
from clipforge.evaluation.compositionality import count_choice_accuracy

COLUMNS = [("count_choice", "count choice among 4 captions (chance 0.25)"), ("count_top1", "zero-shot count top-1"),
           ("object_top1", "compositional object top-1"), ("i2t_R@1", "val i2t R@1"), ("train_s", "train s")]


def measure(model) -> dict:
    img, _, items, tok = split_features(model, "counting")
    captions, truth = [], []
    for it in items:  # the true caption (first template) and its counterfactuals, ordered by count
        n = it["labels"]["count"]  # count - 1
        wrong = list(it["negatives"]["count"])  # counts 1..4 without the true one, in order
        captions.append(wrong[:n] + [it["captions"][0]] + wrong[n:])
        truth.append(n)
    feats = encode_texts(model, [c for row in captions for c in row], tok).view(len(items), 4, -1)
    choice = count_choice_accuracy(img, feats, torch.tensor(truth))
    return {"count_choice": choice["accuracy"], **shapes_metrics(model)}


def main():
    ap = parser(__doc__, steps=250, batch=128)
    ap.add_argument("--weight", type=float, default=1.0, help="weight of the counting loss")
    args = ap.parse_args()
    arms = [("clip", {"clip": 1.0}, {}), (f"clip + {args.weight} counting", {"clip": 1.0, "counting": args.weight}, {})]
    rows = run_arms(arms, args, measure)
    print_table("Counting loss", rows, COLUMNS, args)


if __name__ == "__main__":
    main()
