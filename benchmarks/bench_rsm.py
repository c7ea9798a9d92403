"""RS-M-CLIP on emoji: per-language retrieval of CLIPs trained on English captions only, on every language (the
corpus's names in 14 languages standing in for machine translation), and on every language plus the rsm_distill
self-distillation term. The fidelity recipe benchmarks/fidelity/rs_m_clip.yaml runs :func:`fidelity_arm`.

    python benchmarks/bench_rsm.py --arm rsm --steps 200 --batch 64     # one arm, one seed, printed

Per-language retrieval (:func:`per_language_retrieval`): on emoji's val and test images, for each language L
the images that have a name in L, each with its first name in L; image->text and text->image R@1 among them,
averaged. ``en_R@1`` is English's, ``multi_R@1`` the mean over the 13 other languages.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

ARMS = {
    "en_only": {"loss": {"clip": 1.0}, "languages": ["en"]},
    "translated": {"loss": {"clip": 1.0}, "languages": []},
    "rsm": {"loss": {"clip": 1.0, "rsm_distill": {"weight": 1.0}}, "languages": []},
}


def per_language_retrieval(model, root: str, splits=("val", "test")) -> dict[str, float]:
    """``{lang: (i2t R@1 + t2i R@1) / 2}`` over the images of ``splits`` that have a caption in ``lang``."""
    from clipforge.data.captions import caption_records
    from clipforge.data.shards import ShardDataset
    from clipforge.evaluation import encode_images, encode_texts
    from clipforge.evaluation.retrieval import retrieval_metrics
    from clipforge.tokenizer import get_tokenizer

    items, langs_of = [], []
    for split in splits:
        ds = ShardDataset(root, split=split, image_size=model.image_size)
        for i in range(len(ds)):
            items.append(ds[i])
        langs_of += [list(zip(r["captions"], r.get("caption_langs") or ["en"] * len(r["captions"])))
                     for r in caption_records(ds)]
    tok = get_tokenizer(model.context_length)
    img = encode_images(model, [it["image"] for it in items])
    langs = sorted({lang for pairs in langs_of for _, lang in pairs})
    out = {}
    for lang in langs:
        rows = [(i, next(c for c, la in pairs if la == lang)) for i, pairs in enumerate(langs_of)
                if any(la == lang for _, la in pairs)]
        idx = torch.tensor([i for i, _ in rows])
        txt = encode_texts(model, [c for _, c in rows], tok)
        m = retrieval_metrics(img[idx], txt, torch.arange(len(rows)), ks=(1,))
        out[lang] = 0.5 * (m["i2t_R@1"] + m["t2i_R@1"])
    return out


def train_arm(arm: str, seed: int, steps: int, batch: int, root: str):
    from clipforge.train import DataConfig, TrainConfig, train

    spec = ARMS[arm]
    with tempfile.TemporaryDirectory(prefix=f"fidelity-rsm-{arm}-") as out:
        cfg = TrainConfig(model="tiny", steps=steps, batch_size=batch, lr=2e-3,
                          warmup_steps=min(30, max(1, steps // 10)),
                          weight_decay=0.1, seed=seed, save_every=0, eval_every=0, progress=False, out_dir=out,
                          loss=spec["loss"], ema_momentum=0.996,
                          data=DataConfig(dataset="emoji", root=root, languages=list(spec["languages"]),
                                          view_scale=[0.05, 0.4], view_jitter=0.0))
        return train(cfg.validate()).model.eval()


def fidelity_arm(seed: int, steps: int, batch: int, eval_size: int, arm: str) -> dict:
    """One arm of benchmarks/fidelity/rs_m_clip.yaml: train ``arm`` (``ARMS``) with ``seed``, then per-language
    retrieval on emoji's val+test images (``eval_size`` is not used: the splits are used whole)."""
    from corpus_setup import ensure_corpus

    root = ensure_corpus("emoji")  # $CLIPFORGE_DATA/emoji
    model = train_arm(arm, seed, steps, batch, root)
    with torch.no_grad():
        per = per_language_retrieval(model, root)
    others = [v for k, v in per.items() if k != "en"]
    return {"en_R@1": per["en"], "multi_R@1": sum(others) / len(others)} | {f"R@1_{k}": v for k, v in per.items()}


fidelity_arm.metrics = ("en_R@1", "multi_R@1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=sorted(ARMS), default="rsm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    print(json.dumps(fidelity_arm(args.seed, args.steps, args.batch, 0, args.arm), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
