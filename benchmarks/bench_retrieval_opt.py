"""Retrieval-optimized CLIP (Schall et al., 2024): image-image mAP@10 on near-duplicate families and the text-image
recall kept, for the base model, stage 1 alone, the two-stage recipe and the pseudo-caption variant.

    CLIPFORGE_DATA=... OMP_NUM_THREADS=1 python benchmarks/bench_retrieval_opt.py --steps 40 --ft-steps 20 --seed 0

The base is the small CoCa of benchmarks/bench_retrieval_systems.py (emoji train split, English captions; its CLIP
part is what is fine-tuned and measured). The arms run the configs of the recipe with ``init_from`` the base:

- ``stage1``: configs/retrieval_opt_stage1.yaml (SimCLR augmentation pairs, text tower frozen), ``ft_steps``;
- ``two_stage``: stage 1, then configs/retrieval_opt_stage2.yaml (contrastive, image tower frozen), ``ft_steps``
  each;
- ``pseudo``: configs/retrieval_opt_pseudo.yaml (SimCLR + contrastive against captions, text frozen),
  2 x ``ft_steps`` (the two-stage budget).

Measures on the emoji test split: ``i2i_map10``: every one of 4 perturbed copies of each emoji (seeded crop, color
scaling, noise) queries the others, the copies of the same emoji being relevant (:func:`clipforge.metrics.map_at_k`);
``t2i_r1`` / ``t2i_r5``: the English name of each emoji retrieves its clean image among all test images.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_retrieval_systems import base_model_dir, corpus_root, perturb

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _finetune(config: str, init: Path, out: Path, steps: int, batch: int, seed: int) -> Path:
    from clipforge.train import load_config, train

    cfg = load_config(CONFIGS / config, [f"init_from={init}", "data.dataset=emoji", "data.languages=[en]",
                                         f"steps={steps}", f"batch_size={batch}", f"seed={seed}", "save_every=0",
                                         "eval_every=0", "progress=false", "precision=fp32", f"out_dir={out}",
                                         f"warmup_steps={max(1, steps // 10)}"])
    train(cfg.validate())
    return out


def test_items():
    """(clean uint8 images [N, H, W, 3], English names) of the emoji test split."""
    from clipforge.data.shards import read_manifest, shard_entries
    from clipforge.images import load_image

    root = corpus_root("emoji")
    images, names = [], []
    for shard in read_manifest(root, "emoji")["splits"]["test"]["shards"]:
        path = root / shard["file"]
        for entry in shard_entries(path):
            with open(path, "rb") as f:
                f.seek(entry.offset)
                images.append(np.asarray(load_image(f.read(entry.size))))
            langs = entry.meta["caption_langs"]
            names.append(entry.meta["captions"][langs.index("en")] if "en" in langs else entry.meta["captions"][0])
    return images, names


@torch.no_grad()
def measure(model_dir: Path, seed: int, copies: int = 4) -> dict:
    from PIL import Image

    from clipforge.interop import load
    from clipforge.metrics import map_at_k

    model, tok, pre = load(str(model_dir))
    model.eval()
    images, names = test_items()
    rng = np.random.default_rng(10_000 + seed)
    noisy = [Image.fromarray(perturb(im, rng)) for im in images for _ in range(copies)]
    groups = np.repeat(np.arange(len(images)), copies)
    v = model.encode_image(torch.stack([pre(im) for im in noisy])).float()
    clean = model.encode_image(torch.stack([pre(Image.fromarray(im)) for im in images])).float()
    t = model.encode_text(tok(names)).float()
    ranks = (t @ clean.t()).argsort(dim=1, descending=True)
    pos = (ranks == torch.arange(len(names))[:, None]).float().argmax(1)
    return {"i2i_map10": map_at_k(v, groups, 10), "t2i_r1": float((pos < 1).float().mean()),
            "t2i_r5": float((pos < 5).float().mean())}


def run_arm(arm: str, seed: int, steps: int, batch: int, ft_steps: int) -> dict:
    base = base_model_dir("emoji", seed, steps, batch)
    if arm == "base":
        return measure(base, seed)
    with tempfile.TemporaryDirectory(prefix="bench-ropt-") as tmp:
        tmp = Path(tmp)
        if arm == "stage1":
            out = _finetune("retrieval_opt_stage1.yaml", base, tmp / "s1", ft_steps, batch, seed)
        elif arm == "two_stage":
            s1 = _finetune("retrieval_opt_stage1.yaml", base, tmp / "s1", ft_steps, batch, seed)
            out = _finetune("retrieval_opt_stage2.yaml", s1, tmp / "s2", ft_steps, batch, seed)
        elif arm == "pseudo":
            out = _finetune("retrieval_opt_pseudo.yaml", base, tmp / "p", 2 * ft_steps, batch, seed)
        else:
            raise ValueError(f"arm must be base, stage1, two_stage or pseudo, got {arm!r}")
        return measure(out, seed)


def fidelity_arm(seed: int, steps: int, batch: int, eval_size: int, arm: str = "base", ft_steps: int = 20) -> dict:
    """Fidelity plug-in of benchmarks/fidelity/retrieval_opt.yaml (see the module docstring)."""
    return run_arm(arm, seed, steps, batch, ft_steps)


fidelity_arm.metrics = ("i2i_map10", "t2i_r1", "t2i_r5")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="base CoCa training steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ft-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", nargs="+", default=["base", "stage1", "two_stage", "pseudo"])
    args = ap.parse_args()
    rows = {arm: run_arm(arm, args.seed, args.steps, args.batch, args.ft_steps) for arm in args.arms}
    json.dump(rows, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
