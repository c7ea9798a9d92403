"""``clipforge upcycle``: turn a dense CLIP into a sparse top-k CLIP-MoE (Diversified Multiplet Upcycling)."""
from __future__ import annotations

import argparse

from .common import add_overwrite_argument, check_output_dir

EPILOG = """\
how it works (Zhang et al., 2024, CLIP-MoE): every FFN of the upcycled transformer blocks becomes a
mixture of E experts with a top-k router. With --stage-steps N the experts differ: for each stage
s = 1..E-1 the training set is clustered (k-means on the previous stage's embeddings, labels accumulated
over the stages) and a copy of the dense model fine-tunes only its FFNs for N steps on batches drawn
from one cluster at a time; expert 0 is the dense FFN. With --stage-steps 0 every expert is a copy of
the dense FFN and the MoE computes exactly the dense model. Then train the routers:

  clipforge upcycle runs/a --experts 4 --top-k 2 --stage-steps 200 --out runs/a-moe
  clipforge train init_from=runs/a-moe out_dir=runs/a-moe-router steps=300 \\
      "trainable=['*.mlp.router.weight']" "loss={clip: 1.0, moe_balance: 0.01}"
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("model", help="the dense CLIP: a run or model directory (anything clipforge.load reads)")
    p.add_argument("--out", required=True, help="output model directory (clipforge.load / clipforge train init_from=)")
    add_overwrite_argument(p)
    p.add_argument("--experts", type=int, default=4, help="experts E per MoE layer")
    p.add_argument("--top-k", type=int, default=2, help="experts each token is routed to")
    p.add_argument("--towers", default="vision,text", help="which towers' FFNs to upcycle (default: vision,text)")
    p.add_argument("--layers", type=int, default=None, help="upcycle the last N blocks of each tower (default: all)")
    p.add_argument("--stage-steps", type=int, default=0, help="fine-tuning steps per multiplet stage (0: copies)")
    p.add_argument("--clusters", type=int, default=4, help="k-means clusters per multiplet stage")
    p.add_argument("--dataset", default="shapes", help="training data of the multiplet stages (a dataset name)")
    p.add_argument("--train-size", type=int, default=2048, help="training samples of the multiplet stages")
    p.add_argument("--batch-size", type=int, default=64, help="samples per step of the multiplet stages")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the multiplet stages")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the clustering and the routers")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args) -> int:
    from .. import load
    from ..models import save_model
    from ..train.upcycle import MultipletConfig, diversified_multiplet
    from .common import quiet_logger

    check_output_dir(args.out, args.overwrite)  # before anything loads or trains
    towers = tuple(t.strip() for t in args.towers.split(","))
    cfg = MultipletConfig(experts=args.experts, top_k=args.top_k, towers=towers,
                          layers=args.layers, stage_steps=args.stage_steps, clusters=args.clusters,
                          batch_size=args.batch_size, lr=args.lr, dataset=args.dataset, train_size=args.train_size,
                          seed=args.seed)
    dense = load(args.model)[0]
    with quiet_logger("clipforge", args.quiet):  # progress lines through clipforge's console handler (main.py)
        moe, labels = diversified_multiplet(dense, cfg)
    save_model(moe, args.out)
    active = sum(p.numel() for n, p in moe.named_parameters() if ".experts." not in n)
    per_expert = sum(p.numel() for n, p in moe.named_parameters() if ".experts.0." in n)
    total = sum(p.numel() for p in moe.parameters())
    experts = f"multiplet stages with {[int(x.max()) + 1 for x in labels]} pseudo-labels" if labels \
        else "identical experts"
    print(f"upcycled {args.model}: {cfg.experts} experts, top-{cfg.top_k}, MoE blocks {moe.moe_blocks}; "
          f"{total:,} parameters ({active + cfg.top_k * per_expert:,} active per token); {experts}; "
          f"saved to {args.out}")
    return 0
