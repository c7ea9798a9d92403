"""Reinforcement fine-tuning of a captioner on ``shapes``: SCST with CLIP-S alone vs CLIP-S + grammar reward (Cho et
al. 2022), and CgT-GAN with the CLIP-cos / CLIP-agg rewards (Yu et al. 2023) vs its starting captioner.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_caption_rl.py scst --seed 0 --steps 40
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_caption_rl.py cgtgan --seed 0 --steps 40

Starting captioner (one per seed, trained once and cached under ``$CLIPFORGE_BENCH_CACHE``, default
/tmp/clipforge-bench-caption-rl): ``coca-tiny`` shrunk to 32 px (width 64, 2+2 layers, 1 decoder layer) trained
``base_steps`` steps of 32 on ``shapes`` with {clip: 1, caption: 2}. Both fine-tunings train only CoCa's captioning
half (:class:`clipforge.captioning.CoCaPolicy`) on train-split images (no captions), batches of ``batch``, Adam at
``lr``, decoding at most 16 tokens.

- ``scst``: the reward judge is a frozen copy of the starting CoCa; ``reward=clip_s`` uses CLIP-S, ``reward=grammar``
  first fine-tunes the judge's text tower and a grammar head (``grammar_steps`` steps of 32 shapes train captions
  with their images and one degenerate negative each, :func:`clipforge.captioning.grammar.finetune_grammar`) and
  uses CLIP-S + ``weight`` x grammar probability.
- ``cgtgan``: ``reward=none`` is the starting captioner itself (no fine-tuning); ``cos`` / ``agg`` run
  :class:`clipforge.captioning.cgtgan.CgTGAN` steps with the frozen starting CoCa as the CLIP, a fresh GRU
  discriminator, real captions drawn from 2,000 train scenes other than the images' (unpaired), and for CLIP-agg those
  captions as the aggregated corpus.

Measured on ``eval_size`` held-out val scenes (seed 12345) with greedy captions: CLIP-S under the frozen *starting*
CoCa (the same judge for every arm; the grammar arm's fine-tuned judge is not used to score), attribute accuracy
(color / shape / count named, :func:`clipforge.captioning.attribute_accuracy`; ``attr_mean`` their mean), BLEU-4 and
CIDEr-D against the val captions (clipforge's implementations), and ``repetition`` (the share of captions that repeat
a word or a bigram, :func:`clipforge.captioning.repetition_rate`).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("CLIPFORGE_BENCH_CACHE", "/tmp/clipforge-bench-caption-rl"))
EVAL_SEED = 12345
MAX_LEN = 16
SMALL_COCA = ["model_overrides.embed_dim=64", "model_overrides.vision.image_size=32", "model_overrides.vision.width=64",
              "model_overrides.vision.layers=2", "model_overrides.text.width=64", "model_overrides.text.layers=2",
              "model_overrides.multimodal.layers=1", "model_overrides.multimodal.n_queries=16"]


def base_captioner(seed: int, base_steps: int, batch: int = 32):
    """The starting CoCa of (seed, base_steps, batch): trained once (into a ``.partial`` directory, renamed when
    done), then loaded from the cache; a process that finds another one training it waits for it."""
    import shutil

    from clipforge.interop import load
    from clipforge.train import load_config, train

    out = CACHE / f"coca-shapes-s{seed}-n{base_steps}-b{batch}"
    partial = out.with_name(out.name + ".partial")
    while not out.exists() and _trainer_alive(partial):
        time.sleep(10)
    if not out.exists():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        (partial / "trainer.pid").write_text(str(os.getpid()))
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "coca.yaml", [
            "data.dataset=shapes", "data.train_size=20000", f"steps={base_steps}", f"batch_size={batch}", "lr=2e-3",
            f"warmup_steps={max(1, base_steps // 10)}", f"seed={seed}", "save_every=0", "eval_every=0",
            "progress=false", "precision=fp32", f"out_dir={partial / 'run'}", *SMALL_COCA])
        train(cfg.validate())
        (partial / "run").rename(out)
        shutil.rmtree(partial, ignore_errors=True)
    model, _tok, _pre = load(str(out))
    return model.eval()


def _trainer_alive(partial: Path) -> bool:
    try:
        os.kill(int((partial / "trainer.pid").read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def _images(split: str, size: int, seed: int, image_size: int):
    from clipforge.data import build_dataset
    from clipforge.transforms import normalize_batch

    ds = build_dataset("shapes", split=split, size=size, seed=seed, image_size=image_size)
    items = [ds[i] for i in range(size)]
    return normalize_batch(torch.stack([it["image"] for it in items])), items


@torch.no_grad()
def evaluate(model, judge, images, items) -> dict:
    """Greedy captions of ``images`` scored (module docstring)."""
    from clipforge.captioning import attribute_accuracy, bleu, cider_d, repetition_rate
    from clipforge.captioning.scst import clip_s_reward
    from clipforge.tokenizer import get_tokenizer

    tok = get_tokenizer(model.context_length)
    model.eval()
    caps = [tok.decode(row.tolist()) for i in range(0, len(images), 128)
            for row in model.generate(images[i:i + 128], max_len=MAX_LEN)]
    refs = [list(it["captions"]) for it in items]
    attr = attribute_accuracy(caps, items)
    return {"clip_s": float(clip_s_reward(judge, images, caps).mean()), "attr_color": attr["color"],
            "attr_shape": attr["shape"], "attr_count": attr["count"],
            "attr_mean": (attr["color"] + attr["shape"] + attr["count"]) / 3, "bleu4": bleu(caps, refs),
            "cider_d": cider_d(caps, refs)[0], "repetition": repetition_rate(caps),
            "distinct_captions": len(set(caps))}


def _train_batches(seed: int, image_size: int, size: int = 500):
    images, _ = _images("train", size, seed + 1, image_size)
    gen = torch.Generator().manual_seed(seed)

    def draw(batch: int):
        return images[torch.randint(len(images), (batch,), generator=gen)]

    return draw, gen


def _train_captions(seed: int, n: int = 2000) -> list[str]:
    """Captions of ``n`` train scenes that are not the fine-tuning images (another data seed): the unpaired corpus."""
    from clipforge.data import build_dataset

    ds = build_dataset("shapes", split="train", size=n, seed=seed + 101, image_size=32)
    return [ds.generator.sample(i).captions[0] for i in range(n)]


def scst(seed: int, steps: int, batch: int, eval_size: int, reward: str = "clip_s", base_steps: int = 60,
         lr: float = 2e-4, grammar_steps: int = 40, weight: float = 1.0) -> dict:
    from clipforge.captioning import CoCaPolicy, frozen_judge, scst_step
    from clipforge.captioning.grammar import clip_s_grammar_reward, finetune_grammar

    if reward not in ("clip_s", "grammar"):
        raise ValueError(f"reward must be clip_s or grammar, got {reward!r}")
    torch.manual_seed(seed)
    model = base_captioner(seed, base_steps)
    judge = frozen_judge(model)  # scores every arm, and is the CLIP-S arm's reward
    val_images, val_items = _images("val", eval_size, EVAL_SEED, model.image_size)
    draw, gen = _train_batches(seed, model.image_size)
    t0 = time.perf_counter()
    reward_fn, extra = None, {}
    if reward == "grammar":
        g_judge = copy.deepcopy(judge)
        caps = _train_captions(seed, 512)
        pix, _ = _images("train", 512, seed + 101, model.image_size)  # the scenes of those captions
        head, hist = finetune_grammar(g_judge, caps, pix, steps=grammar_steps, batch_size=32, lr=1e-4, seed=seed)
        reward_fn = clip_s_grammar_reward(g_judge, head, weight=weight)
        extra["grammar_loss_last"] = hist[-1]["grammar"]
    policy = CoCaPolicy(model)
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=lr)
    log = [scst_step(policy, judge, draw(batch), opt, max_len=MAX_LEN, generator=gen, reward=reward_fn)
           for _ in range(steps)]
    out = evaluate(model, judge, val_images, val_items)
    out.update(extra, train_s=time.perf_counter() - t0, reward_first=log[0]["reward_greedy"],
               reward_last=log[-1]["reward_greedy"])
    return out


def cgtgan(seed: int, steps: int, batch: int, eval_size: int, reward: str = "none", base_steps: int = 60,
           lr: float = 2e-4, lam: float = 1.0) -> dict:
    from clipforge.captioning import CoCaPolicy, frozen_judge
    from clipforge.captioning.cgtgan import CaptionDiscriminator, CgTGAN

    if reward not in ("none", "cos", "agg"):
        raise ValueError(f"reward must be none, cos or agg, got {reward!r}")
    torch.manual_seed(seed)
    model = base_captioner(seed, base_steps)
    judge = frozen_judge(model)
    val_images, val_items = _images("val", eval_size, EVAL_SEED, model.image_size)
    t0 = time.perf_counter()
    extra = {}
    if reward != "none":
        draw, gen = _train_batches(seed, model.image_size)
        corpus = _train_captions(seed)
        disc = CaptionDiscriminator()
        gan = CgTGAN(CoCaPolicy(model), judge, disc, reward=reward, lam=lam, corpus=corpus)
        opt_g = torch.optim.Adam(gan.policy.trainable_parameters(), lr=lr)
        opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
        log = []
        for _ in range(steps):
            real = [corpus[int(i)] for i in torch.randint(len(corpus), (batch,), generator=gen)]
            log.append(gan.step(draw(batch), real, opt_g, opt_d, max_len=MAX_LEN, generator=gen))
        extra = {"reward_clip_first": log[0]["reward_clip"], "reward_clip_last": log[-1]["reward_clip"],
                 "discriminator_loss_last": log[-1]["discriminator_loss"]}
    out = evaluate(model, judge, val_images, val_items)
    out.update(extra, train_s=time.perf_counter() - t0)
    return out


METRICS = ("clip_s", "attr_color", "attr_shape", "attr_count", "attr_mean", "bleu4", "cider_d", "repetition")


def scst_arm(seed: int, steps: int, batch: int, eval_size: int, **params) -> dict:
    """Fidelity plug-in of benchmarks/fidelity/scst.yaml."""
    return scst(seed, steps, batch, eval_size, **params)


def cgtgan_arm(seed: int, steps: int, batch: int, eval_size: int, **params) -> dict:
    """Fidelity plug-in of benchmarks/fidelity/cgtgan.yaml."""
    return cgtgan(seed, steps, batch, eval_size, **params)


scst_arm.metrics = METRICS
cgtgan_arm.metrics = METRICS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["scst", "cgtgan"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-size", type=int, default=300)
    ap.add_argument("--base-steps", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    arms = ("clip_s", "grammar") if args.what == "scst" else ("none", "cos", "agg")
    fn = scst if args.what == "scst" else cgtgan
    rows = {a: fn(args.seed, args.steps, args.batch, args.eval_size, reward=a, base_steps=args.base_steps)
            for a in arms}
    json.dump(rows, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
