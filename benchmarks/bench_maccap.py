"""MacCap vs CoCa greedy decoding at equal training time on ``shapes`` (docs/captioning.md).

Per seed, with the same wall-clock budget T for each side:

- CoCa: ``coca-tiny`` trained with {clip: 1, caption: 2} for T seconds, captions by greedy decoding;
- MacCap: the ``tiny`` CLIP trained with {clip: 1} for ``clip_fraction * T`` seconds, then a MacCap
  decoder trained on the *captions only* of the same shapes train scenes for the rest of T; captions by
  MacCap inference (sub-region aggregation, noise, greedy per draw, CLIP re-ranking).

Both are scored on held-out val scenes: attribute accuracy (color / shape / count named), BLEU-4 and
CIDEr-D against the val captions, and CLIP-S under two judges (CoCa's towers and the MacCap CLIP; MacCap
re-ranks with its own CLIP, so that judge favors it).

With ``--scst-seconds S`` each captioner then gets S more seconds of self-critical sequence training with
a CLIP-S reward (clipforge.captioning.scst; CoCa judged by a frozen copy of itself, MacCap by its CLIP) on
train images (no captions), and is scored again: does SCST raise CLIP-S and attribute accuracy?

    OMP_NUM_THREADS=1 PYTHONPATH=src nice python benchmarks/bench_maccap.py \
        --seconds 240 --scst-seconds 90 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from clipforge.captioning import (
    CoCaPolicy,
    MacCapCaptioner,
    MacCapConfig,
    MacCapPolicy,
    attribute_accuracy,
    bleu,
    cider_d,
    clip_s,
    frozen_judge,
    scst_step,
    train_maccap,
)
from clipforge.data import build_dataset
from clipforge.tokenizer import get_tokenizer
from clipforge.train import DataConfig, TrainConfig, train
from clipforge.transforms import normalize_batch


def train_clip(model: str, loss: dict, seconds: float, args, seed: int, out: Path):
    cfg = TrainConfig(model=model, loss=loss, data=DataConfig(train_size=args.train_size), batch_size=args.batch_size,
                      steps=100_000, max_seconds=seconds, lr=1e-3, warmup_steps=30, save_every=0, log_every=10,
                      seed=seed, out_dir=str(out), progress=False)
    return train(cfg)


@torch.no_grad()
def judge(model, images: torch.Tensor, captions: list[str]) -> float:
    tok = get_tokenizer(model.context_length)
    return float(clip_s(model.encode_text(tok(captions)).float(), model.encode_image(images).float()).mean())


def score(name: str, captions: list[str], val, images, judges: dict) -> dict:
    refs = [list(val[i]["captions"]) for i in range(len(val))]
    out = {"attributes": {k: round(v, 3) if isinstance(v, float) else v
                          for k, v in attribute_accuracy(captions, [val[i] for i in range(len(val))]).items()},
           "bleu4": round(bleu(captions, refs), 4), "cider_d": round(cider_d(captions, refs)[0], 4)}
    out.update({f"clip_s_judge_{j}": round(judge(m, images, captions), 4) for j, m in judges.items()})
    logging.info("%s: %s", name, out)
    return out


def run_seed(seed: int, args, out: Path) -> dict:
    t = args.seconds
    coca = train_clip("coca-tiny", {"clip": 1.0, "caption": 2.0}, t, args, seed, out / f"coca-{seed}")
    clip = train_clip("tiny", {"clip": 1.0}, t * args.clip_fraction, args, seed, out / f"clip-{seed}")
    t0 = time.perf_counter()  # MacCap's decoder budget includes reading and encoding its texts
    train_ds = build_dataset("shapes", split="train", size=args.train_size, seed=0, image_size=64)
    texts = [c for i in range(min(args.text_scenes, len(train_ds))) for c in train_ds.generator.sample(i).captions]
    maccap, history = train_maccap(clip.model, texts, MacCapConfig(), steps=1_000_000, batch_size=args.batch_size,
                                   lr=1e-3, seed=seed,
                                   max_seconds=max(1.0, t * (1 - args.clip_fraction) - (time.perf_counter() - t0)))
    maccap_seconds = time.perf_counter() - t0
    val = build_dataset("shapes", split="val", size=args.val_size, seed=12345, image_size=64)
    images = normalize_batch(torch.stack([val[i]["image"] for i in range(len(val))]))
    tok = get_tokenizer(32)
    coca_model = coca.model.eval()
    with torch.no_grad():
        greedy = [tok.decode(g.tolist()) for g in coca_model.generate(images, max_len=32)]
    mc = [r["caption"] for i in range(0, len(val), 64)
          for r in maccap.caption(images[i : i + 64], torch.Generator().manual_seed(seed))]
    judges = {"coca": frozen_judge(coca_model), "maccap_clip": frozen_judge(maccap.clip)}
    result = {
        "seed": seed,
        "train_seconds": {"coca": round(coca.train_seconds, 1), "maccap_clip": round(clip.train_seconds, 1),
                          "maccap_decoder": round(maccap_seconds, 1)},
        "steps": {"coca": coca.step, "maccap_clip": clip.step, "maccap_decoder": history[-1]["step"]},
        "maccap_decoder_loss": [history[0], history[-1]],
        "coca_greedy": score("coca greedy", greedy, val, images, judges),
        "maccap": score("maccap", mc, val, images, judges),
        "examples": [{"truth": val[i]["captions"][0], "coca_greedy": greedy[i], "maccap": mc[i]} for i in range(6)],
    }
    if args.scst_seconds > 0:
        train_images = build_dataset("shapes", split="train", size=2000, seed=seed + 1, image_size=64)
        for name, policy in (("coca", CoCaPolicy(coca_model)), ("maccap", MacCapPolicy(maccap))):
            judge = judges["coca"] if name == "coca" else judges["maccap_clip"]
            opt = torch.optim.Adam(policy.trainable_parameters(), lr=args.scst_lr)
            gen, steps, t0, log = torch.Generator().manual_seed(seed), 0, time.perf_counter(), []
            while time.perf_counter() - t0 < args.scst_seconds:
                idx = torch.randint(len(train_images), (args.scst_batch,), generator=gen)
                imgs = normalize_batch(torch.stack([train_images[int(i)]["image"] for i in idx]))
                log.append(scst_step(policy, judge, imgs, opt, max_len=20, generator=gen))
                steps += 1
            if name == "coca":
                with torch.no_grad():
                    caps = [tok.decode(g.tolist()) for g in coca_model.eval().generate(images, max_len=32)]
            else:
                maccap.decoder.eval()
                caps = [r["caption"] for i in range(0, len(val), 64)
                        for r in maccap.caption(images[i : i + 64], torch.Generator().manual_seed(seed))]
            result[f"{name}_after_scst"] = score(f"{name} after scst", caps, val, images, judges)
            result[f"{name}_scst_steps"] = steps
            result[f"{name}_scst_reward_first_last"] = [log[0], log[-1]] if log else []
    return result


# ---- fidelity plug-ins (benchmarks/fidelity/maccap.yaml and maccap_rl.yaml) ----

CACHE = Path(os.environ.get("CLIPFORGE_BENCH_CACHE", "/tmp/clipforge-bench-maccap"))
EVAL_SEED = 12345
MAX_LEN = 20
METRICS = ("attr_color", "attr_shape", "attr_count", "attr_mean", "bleu4", "cider_d", "clip_s", "repetition",
           "distinct_captions")


def _val(eval_size: int, image_size: int = 64):
    val = build_dataset("shapes", split="val", size=eval_size, seed=EVAL_SEED, image_size=image_size)
    items = [val[i] for i in range(len(val))]
    return normalize_batch(torch.stack([it["image"] for it in items])), items


def _maccap_captions(captioner, images: torch.Tensor, seed: int) -> list[str]:
    """MacCap inference (sub-region features, noise draws, CLIP re-ranking), one fixed generator per evaluation."""
    gen = torch.Generator().manual_seed(seed)
    captioner.decoder.eval()
    return [r["caption"] for i in range(0, len(images), 64) for r in captioner.caption(images[i:i + 64], gen)]


def score_captions(captions: list[str], items: list[dict], images: torch.Tensor, judge) -> dict:
    """The metrics of both recipes: attribute accuracy (color / shape / count named; ``attr_mean`` their mean),
    BLEU-4 and CIDEr-D against the scenes' captions, CLIP-S under ``judge``, repetition, distinct captions."""
    from clipforge.captioning import repetition_rate
    from clipforge.captioning.scst import clip_s_reward

    refs = [list(it["captions"]) for it in items]
    attr = attribute_accuracy(captions, items)
    with torch.no_grad():
        s = float(clip_s_reward(judge, images, captions).mean())
    return {"attr_color": attr["color"], "attr_shape": attr["shape"], "attr_count": attr["count"],
            "attr_mean": (attr["color"] + attr["shape"] + attr["count"]) / 3, "bleu4": bleu(captions, refs),
            "cider_d": cider_d(captions, refs)[0], "clip_s": s, "repetition": repetition_rate(captions),
            "distinct_captions": len(set(captions))}


def _texts(n_scenes: int) -> list[str]:
    ds = build_dataset("shapes", split="train", size=n_scenes, seed=0, image_size=64)
    return [c for i in range(n_scenes) for c in ds.generator.sample(i).captions]


def _fit(model: str, loss: dict, seed: int, steps: int, batch: int, out: Path, seconds: float | None = None,
         train_size: int = 20_000, precision: str = "fp32"):
    cfg = TrainConfig(model=model, loss=loss, data=DataConfig(train_size=train_size), batch_size=batch, steps=steps,
                      max_seconds=seconds, lr=1e-3, warmup_steps=min(30, max(1, steps // 10)), save_every=0,
                      log_every=10, seed=seed, out_dir=str(out), progress=False, precision=precision)
    return train(cfg)


def equal_time_arm(seed: int, steps: int, batch: int, eval_size: int, method: str = "maccap", seconds: float = 240.0,
                   clip_fraction: float = 0.6, text_scenes: int = 5000, precision: str = "fp32") -> dict:
    """Fidelity plug-in of maccap.yaml: one captioner trained for ``seconds`` of wall-clock (``steps`` only caps the
    steps; it is never reached at these budgets), as :func:`run_seed` does: ``coca`` = coca-tiny with {clip: 1,
    caption: 2}, greedy captions; ``maccap`` = the tiny CLIP with {clip: 1} for ``clip_fraction`` of the time, then a
    MacCap decoder on the captions alone (reading and encoding them counted) for the rest, MacCap inference.
    CLIP-S is under each arm's own CLIP (reported, not compared across arms)."""
    import tempfile

    if method not in ("coca", "maccap"):
        raise ValueError(f"method must be coca or maccap, got {method!r}")
    torch.manual_seed(seed)
    images, items = _val(eval_size)
    with tempfile.TemporaryDirectory(prefix="fidelity-maccap-") as tmp:
        if method == "coca":
            run = _fit("coca-tiny", {"clip": 1.0, "caption": 2.0}, seed, steps, batch, Path(tmp), seconds,
                       precision=precision)
            model = run.model.eval()
            tok = get_tokenizer(32)
            with torch.no_grad():
                caps = [tok.decode(g.tolist()) for i in range(0, len(images), 128)
                        for g in model.generate(images[i:i + 128], max_len=32)]
            out = score_captions(caps, items, images, frozen_judge(model))
            return {**out, "train_steps": run.step, "decoder_steps": 0, "train_s": run.train_seconds}
        run = _fit("tiny", {"clip": 1.0}, seed, steps, batch, Path(tmp), seconds * clip_fraction, precision=precision)
    t0 = time.perf_counter()
    texts = _texts(text_scenes)
    left = max(1.0, seconds * (1 - clip_fraction) - (time.perf_counter() - t0))
    captioner, history = train_maccap(run.model, texts, MacCapConfig(), steps=1_000_000, batch_size=batch, lr=1e-3,
                                      seed=seed, max_seconds=left)
    caps = _maccap_captions(captioner, images, seed)
    out = score_captions(caps, items, images, frozen_judge(captioner.clip))
    return {**out, "train_steps": run.step, "decoder_steps": history[-1]["step"],
            "train_s": run.train_seconds + time.perf_counter() - t0}


def base_maccap(seed: int, clip_steps: int = 300, decoder_steps: int = 400, batch: int = 64,
                text_scenes: int = 5000):
    """The starting MacCap captioner of maccap_rl.yaml for (seed, budget): the tiny CLIP {clip: 1} for
    ``clip_steps`` x ``batch`` in fp32, then a MacCap decoder for ``decoder_steps`` on the captions of
    ``text_scenes`` train scenes. Trained once into a ``.partial`` directory (renamed when done) under
    ``$CLIPFORGE_BENCH_CACHE``, then loaded, so every arm of a seed starts from the same captioner."""
    import shutil

    out = CACHE / f"maccap-shapes-s{seed}-c{clip_steps}-d{decoder_steps}-b{batch}-t{text_scenes}"
    partial = out.with_name(out.name + ".partial")
    if not out.exists():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        run = _fit("tiny", {"clip": 1.0}, seed, clip_steps, batch, partial / "clip")
        captioner, _ = train_maccap(run.model, _texts(text_scenes), MacCapConfig(), steps=decoder_steps,
                                    batch_size=batch, lr=1e-3, seed=seed)
        captioner.save(partial / "captioner")
        (partial / "captioner").rename(out)
        shutil.rmtree(partial, ignore_errors=True)
    return MacCapCaptioner.load(out)


def rl_arm(seed: int, steps: int, batch: int, eval_size: int, method: str = "none", lr: float = 5e-5,
           clip_steps: int = 300, decoder_steps: int = 400, lam: float = 1.0) -> dict:
    """Fidelity plug-in of maccap_rl.yaml: the starting MacCap captioner (:func:`base_maccap`) as it is
    (``none``), after ``steps`` SCST steps with the CLIP-S reward (``scst``; Rennie et al. 2017, reward of Cho et al.
    2022), or after ``steps`` CgT-GAN steps with the CLIP-cos / CLIP-agg reward (``cgtgan_cos`` / ``cgtgan_agg``; Yu et
    al. 2023; a fresh GRU discriminator, real captions of 2,000 other train scenes, unpaired). Only the decoder
    trains (:class:`MacCapPolicy`); the judge of every arm is the starting captioner's frozen CLIP, so CLIP-S is
    comparable across arms. Evaluated with MacCap inference on ``eval_size`` val scenes."""
    from clipforge.captioning.cgtgan import CaptionDiscriminator, CgTGAN

    if method not in ("none", "scst", "cgtgan_cos", "cgtgan_agg"):
        raise ValueError(f"method must be none, scst, cgtgan_cos or cgtgan_agg, got {method!r}")
    torch.manual_seed(seed)
    captioner = base_maccap(seed, clip_steps, decoder_steps)
    judge = frozen_judge(captioner.clip)
    images, items = _val(eval_size, captioner.image_size)
    train_images = normalize_batch(torch.stack([it["image"] for it in (lambda ds: [ds[i] for i in range(2000)])(
        build_dataset("shapes", split="train", size=2000, seed=seed + 1, image_size=captioner.image_size))]))
    gen = torch.Generator().manual_seed(seed)
    policy, log, t0 = MacCapPolicy(captioner), [], time.perf_counter()
    if method == "scst":
        opt = torch.optim.Adam(policy.trainable_parameters(), lr=lr)
        for _ in range(steps):
            idx = torch.randint(len(train_images), (batch,), generator=gen)
            log.append(scst_step(policy, judge, train_images[idx], opt, max_len=MAX_LEN, generator=gen))
    elif method.startswith("cgtgan"):
        corpus_ds = build_dataset("shapes", split="train", size=2000, seed=seed + 101, image_size=32)
        corpus = [corpus_ds.generator.sample(i).captions[0] for i in range(2000)]
        disc = CaptionDiscriminator()
        gan = CgTGAN(policy, judge, disc, reward=method.split("_")[1], lam=lam, corpus=corpus)
        opt_g = torch.optim.Adam(policy.trainable_parameters(), lr=lr)
        opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
        for _ in range(steps):
            idx = torch.randint(len(train_images), (batch,), generator=gen)
            real = [corpus[int(i)] for i in torch.randint(len(corpus), (batch,), generator=gen)]
            log.append(gan.step(train_images[idx], real, opt_g, opt_d, max_len=MAX_LEN, generator=gen))
    train_s = time.perf_counter() - t0
    out = score_captions(_maccap_captions(captioner, images, seed), items, images, judge)
    return {**out, "train_s": train_s}


equal_time_arm.metrics = METRICS + ("train_steps", "decoder_steps")
rl_arm.metrics = METRICS


def table(report: dict) -> str:
    """Markdown: mean (min-max over seeds) of each metric per arm."""
    runs = report["runs"]
    arms = [a for a in ("coca_greedy", "maccap", "coca_after_scst", "maccap_after_scst") if a in runs[0]]
    metrics = [("color", lambda r: r["attributes"]["color"]), ("shape", lambda r: r["attributes"]["shape"]),
               ("count", lambda r: r["attributes"]["count"]), ("BLEU-4", lambda r: r["bleu4"]),
               ("CIDEr-D", lambda r: r["cider_d"]), ("CLIP-S (CoCa judge)", lambda r: r["clip_s_judge_coca"]),
               ("CLIP-S (MacCap CLIP judge)", lambda r: r["clip_s_judge_maccap_clip"])]
    lines = ["| arm | " + " | ".join(m for m, _ in metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for arm in arms:
        cells = []
        for _, get in metrics:
            vals = [get(run[arm]) for run in runs]
            mean = sum(vals) / len(vals)
            cells.append(f"{mean:.3f}" + (f" ({min(vals):.3f}-{max(vals):.3f})" if len(vals) > 1 else ""))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=240, help="training wall-clock per method")
    p.add_argument("--clip-fraction", type=float, default=0.6, help="share of MacCap's budget for its CLIP")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--scst-seconds", type=float, default=0, help="SCST after the comparison, per captioner (0: none)")
    p.add_argument("--scst-batch", type=int, default=32)
    p.add_argument("--scst-lr", type=float, default=5e-5, help="Adam learning rate (Rennie et al.: 5e-5)")
    p.add_argument("--train-size", type=int, default=20_000)
    p.add_argument("--text-scenes", type=int, default=5000, help="train scenes whose captions MacCap reads")
    p.add_argument("--val-size", type=int, default=300)
    p.add_argument("--out", default="runs/bench_maccap")
    p.add_argument("--table", metavar="REPORT", help="print the markdown table of a report.json and exit")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args, out))
        (out / "report.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=1))
    logging.info("%s", json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
