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
import time
from pathlib import Path

import torch

from clipforge.captioning import (
    CoCaPolicy,
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
