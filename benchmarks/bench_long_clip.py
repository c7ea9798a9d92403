"""Long-CLIP on ``shapes_long`` (synthetic long captions; docs/models.md).

1. How much of the long captions a 77-token and a 248-token text tower read.
2. A ``tiny`` CLIP with a 77-position text tower is trained on the short ``shapes`` captions, then
   evaluated on long-caption and short-caption (first sentence) retrieval over 500 val scenes:
   (a) as trained (long captions cut at 77 tokens); (b) stretched to 248 positions, no training;
   (c) fine-tuned on the long captions at 77 tokens with the CLIP loss (the paper's naive baseline);
   (d) stretched + fine-tuned with Long-CLIP's loss (long caption + first sentence vs PCA image feature).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_long_clip.py --out runs/bench_long_clip
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from clipforge.data import build_dataset
from clipforge.data.long_captions import short_and_long
from clipforge.evaluation.retrieval import retrieval_metrics
from clipforge.models.long_clip import stretch_context
from clipforge.tokenizer import get_tokenizer
from clipforge.train import DataConfig, TrainConfig, train
from clipforge.transforms import normalize_batch

CTX77 = {"text": {"context_length": 77}}


@torch.no_grad()
def retrieval(model, val) -> dict:
    tok = get_tokenizer(model.context_length)
    model = model.eval()
    images = normalize_batch(torch.stack([val[i]["image"] for i in range(len(val))]))
    img = model.encode_image(images)
    out = {}
    for kind in ("long", "short"):
        texts = [val[i]["long_caption"] if kind == "long" else short_and_long(val[i]["long_caption"])[0]
                 for i in range(len(val))]
        txt = torch.cat([model.encode_text(tok(texts[j:j + 100])) for j in range(0, len(texts), 100)])
        m = retrieval_metrics(img, txt, torch.arange(len(val)))
        out[kind] = {
            "i2t_R@1": round(m["i2t_R@1"], 3),
            "t2i_R@1": round(m["t2i_R@1"], 3),
            "t2i_R@5": round(m["t2i_R@5"], 3),
        }
    return out


_BASES: dict[tuple[int, int, int], tempfile.TemporaryDirectory] = {}  # fidelity: pre-trained base per seed


def fidelity_arm(seed: int, steps: int, batch: int, eval_size: int, arm: str, pretrain_ratio: float = 2.5) -> dict:
    """One arm of the fidelity recipe ``long_clip`` (benchmarks/fidelity.py): the ``tiny`` 77-position CLIP
    pre-trained on short ``shapes`` captions for ``pretrain_ratio`` x ``steps`` steps (once per seed and budget,
    shared by the arms), then fine-tuned for ``steps`` on ``shapes_long`` as (c) ``naive77`` (CLIP loss, long
    captions cut at 77 tokens) or (d) ``long_clip`` (stretched to 248 positions, Long-CLIP's loss); long- and
    short-caption retrieval R@1 on ``eval_size`` val scenes."""
    if arm not in ("naive77", "long_clip"):
        raise ValueError(f"fidelity_arm: arm must be naive77 or long_clip, got '{arm}'")
    pretrain_steps = max(1, round(pretrain_ratio * steps))
    common = dict(batch_size=batch, save_every=0, log_every=10, progress=False, seed=seed)
    key = (seed, pretrain_steps, batch)
    if key not in _BASES:
        tmp = tempfile.TemporaryDirectory(prefix="fidelity-long-clip-")
        train(TrainConfig(model="tiny", model_overrides=CTX77, data=DataConfig(train_size=20_000), steps=pretrain_steps,
                          lr=1e-3, warmup_steps=min(20, max(1, pretrain_steps // 10)), out_dir=tmp.name, **common))
        _BASES[key] = tmp
    ft = dict(steps=steps, lr=2e-4, warmup_steps=min(5, max(1, steps // 10)), init_from=_BASES[key].name, **common)
    with tempfile.TemporaryDirectory(prefix="fidelity-long-clip-ft-") as out:
        if arm == "naive77":
            cfg = TrainConfig(data=DataConfig(dataset="shapes_long", train_size=20_000, caption_policy="longest"),
                              loss={"clip": 1.0}, out_dir=out, **ft)
        else:
            cfg = TrainConfig(data=DataConfig(dataset="shapes_long", train_size=20_000, caption_policy="longest",
                                              positive_source="first_sentence", positives=1),
                              loss={"long_clip": 1.0}, long_context_factor=4, long_context_keep=20, out_dir=out, **ft)
        result = train(cfg.validate())
    val = build_dataset("shapes_long", split="val", size=eval_size, seed=12345, image_size=64)
    r = retrieval(result.model, val)
    return {f"{kind}_{m}": r[kind][m] for kind in ("long", "short") for m in ("i2t_R@1", "t2i_R@1")} | {
        "finetune_s": result.train_seconds}


fidelity_arm.metrics = ("long_i2t_R@1", "long_t2i_R@1", "short_i2t_R@1", "short_t2i_R@1")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--finetune-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="runs/bench_long_clip")
    args = p.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    val = build_dataset("shapes_long", split="val", size=500, seed=12345, image_size=64)
    longs = [val[i]["long_caption"] for i in range(len(val))]
    tok = get_tokenizer(77)
    lengths = torch.tensor([len(ids) + 2 for ids in tok.encode_batch(longs)], dtype=torch.float)
    report = {"tokens": {"mean": round(float(lengths.mean()), 1), "max": int(lengths.max()),
                         "over_77": round(float((lengths > 77).float().mean()), 3),
                         "over_248": round(float((lengths > 248).float().mean()), 3),
                         "kept_at_77": round(float(lengths.clamp(max=77).sum() / lengths.sum()), 3),
                         "kept_at_248": round(float(lengths.clamp(max=248).sum() / lengths.sum()), 3)}}
    common = dict(batch_size=args.batch_size, save_every=0, log_every=10, progress=False, seed=0)
    base_cfg = TrainConfig(model="tiny", model_overrides=CTX77, data=DataConfig(train_size=20_000),
                           steps=args.pretrain_steps, lr=1e-3, warmup_steps=20, out_dir=str(out / "base"), **common)
    base = train(base_cfg)
    report["a_base_77"] = retrieval(base.model, val)
    report["b_stretched_248_no_training"] = retrieval(stretch_context(base.model), val)
    ft = dict(steps=args.finetune_steps, lr=2e-4, warmup_steps=5, init_from=str(out / "base"), **common)
    naive = train(TrainConfig(data=DataConfig(dataset="shapes_long", train_size=20_000, caption_policy="longest"),
                              loss={"clip": 1.0}, out_dir=str(out / "naive77"), **ft))
    report["c_finetune_clip_long_77"] = retrieval(naive.model, val)
    long_clip = train(TrainConfig(data=DataConfig(dataset="shapes_long", train_size=20_000, caption_policy="longest",
                                                  positive_source="first_sentence", positives=1),
                                  loss={"long_clip": 1.0}, long_context_factor=4, long_context_keep=20,
                                  out_dir=str(out / "longclip248"), **ft))
    report["d_stretch_finetune_long_clip_248"] = retrieval(long_clip.model, val)
    report["seconds"] = {"pretrain": round(base.train_seconds, 1), "naive77": round(naive.train_seconds, 1),
                         "longclip248": round(long_clip.train_seconds, 1)}
    print(json.dumps(report, indent=1))
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
