"""Grammar fine-tuning of CLIP's text encoder (Cho et al., 2022; clipforge.captioning.grammar): does the reward tell a
real caption from its degenerate versions better than CLIP-S alone, while text-image retrieval is kept?

    CLIPFORGE_DATA=... OMP_NUM_THREADS=1 python benchmarks/bench_grammar.py --steps 40 --ft-steps 40 --seed 0

The base CLIP is the CLIP part of the small CoCa of benchmarks/bench_retrieval_systems.py (emoji train split,
English captions). ``clip_s`` scores with CLIP-S alone; ``grammar`` fine-tunes the text tower and a grammar head for
``ft_steps`` (batches of 32 English emoji names of the train split with their images and one repeated, truncated
or shuffled negative each) and scores with CLIP-S + 1.0 x grammar probability (the SCST reward of the paper).

Measures on the emoji test split (English names with 2+ words, their images): ``real_over_<kind>``: the fraction
of (name, negative of that kind) pairs in which the reward of the real name with its image is higher than the
negative's with the same image; ``t2i_r1``: the names retrieve their images by CLIP cosine (kept or not).
"""
from __future__ import annotations

import argparse
import json
import random
import sys

import torch
from bench_retrieval_opt import test_items
from bench_retrieval_systems import base_model_dir


def _train_names(limit: int = 2000):
    from bench_retrieval_systems import corpus_root

    from clipforge.data.shards import read_manifest, shard_entries
    from clipforge.images import load_image

    root = corpus_root("emoji")
    images, names = [], []
    for shard in read_manifest(root, "emoji")["splits"]["train"]["shards"]:
        path = root / shard["file"]
        for entry in shard_entries(path):
            langs = entry.meta["caption_langs"]
            if "en" not in langs:
                continue
            with open(path, "rb") as f:
                f.seek(entry.offset)
                images.append(load_image(f.read(entry.size)))
            names.append(entry.meta["captions"][langs.index("en")])
            if len(names) >= limit:
                return images, names
    return images, names


@torch.no_grad()
def measure(model, pre, tok, reward, seed: int) -> dict:
    from PIL import Image

    from clipforge.captioning.grammar import KINDS, degenerate_caption

    images, names = test_items()
    keep = [i for i, n in enumerate(names) if len(n.split()) >= 2]
    pix = torch.stack([pre(Image.fromarray(images[i])) for i in keep])
    real = [names[i] for i in keep]
    rng = random.Random(20_000 + seed)
    out = {}
    r_real = reward(pix, real)
    for kind in KINDS:
        negs = [degenerate_caption(n, kind, rng) for n in real]
        out[f"real_over_{kind}"] = float((r_real > reward(pix, negs)).float().mean())
    v = torch.nn.functional.normalize(model.encode_image(pix).float(), dim=-1)
    t = torch.nn.functional.normalize(model.encode_text(tok(real)).float(), dim=-1)
    out["t2i_r1"] = float(((t @ v.t()).argmax(1) == torch.arange(len(real))).float().mean())
    return out


def run(arm: str, seed: int, steps: int, batch: int, ft_steps: int) -> dict:
    from clipforge.captioning.grammar import clip_s_grammar_reward, finetune_grammar
    from clipforge.captioning.scst import clip_s_reward
    from clipforge.interop import load

    model, tok, pre = load(str(base_model_dir("emoji", seed, steps, batch)))
    model.eval()
    if arm == "clip_s":
        return measure(model, pre, tok, lambda ims, texts: clip_s_reward(model, ims, texts), seed)
    if arm != "grammar":
        raise ValueError(f"arm must be clip_s or grammar, got {arm!r}")
    images, names = _train_names()
    pix = torch.stack([pre(im) for im in images])
    head, _ = finetune_grammar(model, names, pix, steps=ft_steps, batch_size=32, lr=1e-4, seed=seed)
    return measure(model, pre, tok, clip_s_grammar_reward(model, head, weight=1.0), seed)


def fidelity_arm(seed: int, steps: int, batch: int, eval_size: int, arm: str = "clip_s", ft_steps: int = 40) -> dict:
    """Fidelity plug-in of benchmarks/fidelity/grammar.yaml (see the module docstring)."""
    return run(arm, seed, steps, batch, ft_steps)


fidelity_arm.metrics = ("real_over_repeat", "real_over_truncate", "real_over_shuffle", "t2i_r1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ft-steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = {arm: run(arm, args.seed, args.steps, args.batch, args.ft_steps) for arm in ("clip_s", "grammar")}
    json.dump(rows, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
