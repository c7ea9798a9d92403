"""Fidelity (b): the contrastive-gap terms shrink the modality gap.

Fahim et al. ("It's Not a Modality Gap: Characterizing and Addressing the Contrastive Gap",
2024) add uniformity and alignment to the CLIP loss and report a smaller gap between the
image and text embedding clusters. Both arms train `tiny` on `shapes` identically except for
the loss; the gap is the distance between the centroids of the L2-normalized image and
caption embeddings of held-out `val` samples (clipforge.evaluation.diagnostics.modality_gap).

    python benchmarks/fidelity_gap.py [--steps 250] [--batch 128] [--seeds 0 1] [--weight 0.5]
"""
from __future__ import annotations

from fidelity_common import parser, print_table, run_arms, shapes_metrics, split_features

from clipforge.evaluation.diagnostics import alignment, modality_gap, uniformity

COLUMNS = [("gap", "modality gap (centroid distance)"), ("pos_cos", "mean cosine of true pairs"),
           ("uniformity", "uniformity (joint, t=2)"), ("object_top1", "compositional object top-1"),
           ("i2t_R@1", "val i2t R@1"), ("t2i_R@1", "val t2i R@1"), ("train_s", "train s")]


def measure(model) -> dict:
    img, txt, _, _ = split_features(model, "val")
    import torch

    metrics = {"gap": modality_gap(img, txt), "pos_cos": float((img * txt).sum(-1).mean()),
               "uniformity": uniformity(torch.cat([img, txt])), "alignment": alignment(img, txt)}
    return {**metrics, **shapes_metrics(model)}


def main():
    ap = parser(__doc__, steps=250, batch=128)
    ap.add_argument("--weight", type=float, default=0.5, help="weight of each of uniformity and alignment")
    args = ap.parse_args()
    w = args.weight
    arms = [("clip", {"clip": 1.0}, {}),
            (f"clip + {w} uniformity + {w} alignment", {"clip": 1.0, "uniformity": w, "alignment": w}, {})]
    rows = run_arms(arms, args, measure)
    print_table("Contrastive gap terms and the modality gap", rows, COLUMNS, args)


if __name__ == "__main__":
    main()
