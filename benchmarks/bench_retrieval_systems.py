"""CLIP as a retrieval system: vision-free retrieval (clipforge.serve.describe) against image-embedding search, and
CLIPPINGS record linkage (clipforge.adapt.clippings) image-only vs text-only vs pooled, on the built corpora.

    clipforge data build emoji && clipforge data build openclipart
    OMP_NUM_THREADS=1 python benchmarks/bench_retrieval_systems.py retrieval --corpus emoji --steps 60 --seed 0
    OMP_NUM_THREADS=1 python benchmarks/bench_retrieval_systems.py linkage --steps 60 --seed 0

Both share one base model per (corpus, seed, steps, batch): a small CoCa (``coca-tiny`` shrunk to 32 px, width
64, 2+2 layers, 1 decoder layer) trained on the corpus's train split, English captions, contrastive +
captioning loss; its CLIP part embeds images and texts, its decoder describes images. It is written under
``$CLIPFORGE_BENCH_CACHE`` (default /tmp/clipforge-bench-retrieval) and reused.

retrieval: the test split is indexed twice with the library (``build_index``): image embeddings of the base
CLIP, and MiniLM embeddings of the base CoCa's greedy descriptions. Each test item's first English caption
(emoji: the CLDR name; openclipart: the title) is a query whose one relevant item is its own image; R@1/5/10
over the test split, and the median wall time of one ``Searcher.text`` query (query encoding + exact search).

linkage: emoji test records, one per (emoji, language) with its name in that language and the emoji's
image perturbed per record (seeded random crop, color scaling and pixel noise: the noisy variant); the
entity is the emoji. Pooled, image-only or text-only embeddings of the base CLIP, optionally fine-tuned
(``finetune_steps``) with the supervised contrastive loss on the records of the first 150 train-split emoji; linked
by nearest neighbour above a threshold chosen on the val split (the grid 0.30..0.99 maximizing ARI on the records
of the first 60 val-split emoji, built the same way); pairwise precision/recall/F1 and ARI on test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CACHE = Path(os.environ.get("CLIPFORGE_BENCH_CACHE", "/tmp/clipforge-bench-retrieval"))
TRAIN_ENTITIES, VAL_ENTITIES = 150, 60  # linkage: emoji whose records fine-tune / choose the threshold
SMALL_COCA = ["model_overrides.embed_dim=64", "model_overrides.vision.image_size=32", "model_overrides.vision.width=64",
              "model_overrides.vision.layers=2", "model_overrides.text.width=64", "model_overrides.text.layers=2",
              "model_overrides.multimodal.layers=1", "model_overrides.multimodal.n_queries=16"]


def base_model_dir(corpus: str, seed: int, steps: int, batch: int) -> Path:
    """The trained base CoCa of (corpus, seed, steps, batch): trained once, then read from the cache.

    Training holds a lock beside the cache entry, so a second benchmark process waits for the first (up to an
    hour) instead of training it twice; the lock dies with its process, so a directory left by a training that
    failed is removed and trained again rather than waited on."""
    import shutil

    from clipforge.locking import exclusive_lock
    from clipforge.train import load_config, train

    out = CACHE / f"coca-{corpus}-s{seed}-n{steps}-b{batch}"
    if (out / "checkpoints" / "latest.json").exists():
        return out
    with exclusive_lock(CACHE / ".locks" / out.name, f"the cached base CoCa {out.name}", timeout=3600):
        if (out / "checkpoints" / "latest.json").exists():  # trained by the process that held the lock
            return out
        shutil.rmtree(out, ignore_errors=True)  # left by a training that died before its checkpoint
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "coca.yaml", [
            f"data.dataset={corpus}", "data.languages=[en]", f"steps={steps}", f"batch_size={batch}", "lr=2e-3",
            f"warmup_steps={max(1, steps // 10)}", f"seed={seed}", "save_every=0", "eval_every=0", "progress=false",
            "precision=fp32", f"out_dir={out}", *SMALL_COCA])
        train(cfg.validate())
    return out


def corpus_root(corpus: str) -> Path:
    from clipforge.data.shards import corpus_root as root

    return root(corpus, None)


def first_english(meta_captions, langs) -> str:
    for c, lang in zip(meta_captions, langs or ["en"] * len(meta_captions)):
        if lang == "en":
            return c
    return meta_captions[0]


def recall_at(ranks: list[int], k: int) -> float:
    return float(np.mean([r < k for r in ranks]))


def retrieval(corpus: str, seed: int, steps: int, batch: int, index: str, max_queries: int | None = None) -> dict:
    """R@1/5/10 and median query latency (ms) of ``index`` (``image`` or ``describe``) on the test split."""
    from clipforge.interop import load
    from clipforge.serve.describe import load_describer
    from clipforge.serve.index import build_index, scan_corpus
    from clipforge.serve.search import Searcher

    model_dir = base_model_dir(corpus, seed, steps, batch)
    candidates = scan_corpus(corpus, "test", corpus_root(corpus), ["en"])
    if max_queries:
        candidates = candidates[:max_queries]
    queries = [c.row["caption"] for c in candidates]
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
        if index == "describe":
            model, preprocess = load_describer(str(model_dir), max_len=16, sentence_spec="minilm")
            extra, loaded = {"describe": model.record}, (model, preprocess)
        else:
            model, tokenizer, preprocess = load(str(model_dir))
            extra, loaded = None, (model, tokenizer, preprocess)
        build_index(model, preprocess, Path(tmp) / "idx", candidates, model_source=str(model_dir), dtype="float32",
                    progress=False, index_kind="flat", manifest_extra=extra)
        s = Searcher(Path(tmp) / "idx", model=loaded, backend="numpy")
        keys = s.data.meta["key"]
        ranks, times = [], []
        for c, q in zip(candidates, queries):
            t0 = time.perf_counter()
            hits = s.text(q, k=len(keys))
            times.append((time.perf_counter() - t0) * 1000)
            ranks.append(next(i for i, h in enumerate(hits) if h.key == c.row["key"]))
        distinct = len(set(s.data.meta["description"])) if index == "describe" else len(keys)
    return {"R@1": recall_at(ranks, 1), "R@5": recall_at(ranks, 5), "R@10": recall_at(ranks, 10),
            "latency_ms": statistics.median(times), "items": len(ranks), "distinct_descriptions": distinct}


def retrieval_arm(seed: int, steps: int, batch: int, eval_size: int, corpus: str = "emoji",
                  index: str = "image") -> dict:
    """Fidelity plug-in: one index kind on one corpus (see :func:`retrieval`)."""
    out = retrieval(corpus, seed, steps, batch, index, max_queries=eval_size)
    return {k: out[k] for k in retrieval_arm.metrics}


retrieval_arm.metrics = ("R@1", "R@5", "R@10", "latency_ms")


def perturb(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A noisy copy of a uint8 [H, W, 3] image: random crop (80-100 %) resized back, per-channel scaling, noise."""
    from PIL import Image

    h, w = img.shape[:2]
    s = rng.uniform(0.8, 1.0)
    ch, cw = int(h * s), int(w * s)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(img[y:y + ch, x:x + cw]).resize((w, h), Image.BILINEAR)
    out = np.asarray(crop).astype(np.float32) * rng.uniform(0.8, 1.2, size=3) + rng.normal(0, 12, size=img.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def emoji_records(split: str, seed: int, max_entities: int | None = None):
    """(PIL images, texts, entity ids) of the noisy emoji linkage set of ``split``: one record per (emoji, language),
    the emoji's first name in that language and its image perturbed for that record."""
    from PIL import Image

    from clipforge.data.shards import read_manifest, shard_entries
    from clipforge.images import load_image

    root = corpus_root("emoji")
    rng = np.random.default_rng(seed)
    images, texts, entities = [], [], []
    e = 0
    for shard in read_manifest(root, "emoji")["splits"][split]["shards"]:
        path = root / shard["file"]
        for entry in shard_entries(path):
            if max_entities is not None and e >= max_entities:
                break
            with open(path, "rb") as f:
                f.seek(entry.offset)
                base = np.asarray(load_image(f.read(entry.size)))
            seen = set()
            for cap, lang in zip(entry.meta["captions"], entry.meta["caption_langs"]):
                if lang not in seen:
                    seen.add(lang)
                    images.append(Image.fromarray(perturb(base, rng)))
                    texts.append(cap)
                    entities.append(e)
            e += 1
    return images, texts, np.array(entities)


def _embed(model, preprocess, tok, images, texts):
    pixels = torch.stack([preprocess(im) for im in images])
    return pixels, tok(texts)


def linkage(seed: int, steps: int, batch: int, modality: str, finetune_steps: int = 0, method: str = "nn",
            max_entities: int | None = None) -> dict:
    from clipforge.adapt.clippings import FinetuneConfig, embed_records, finetune, link
    from clipforge.interop import load
    from clipforge.metrics import adjusted_rand_index, pairwise_linkage_metrics

    model, tok, preprocess = load(str(base_model_dir("emoji", seed, steps, batch)))
    if finetune_steps:
        ims, txt, ent = emoji_records("train", seed, max_entities=TRAIN_ENTITIES)
        pixels, tokens = _embed(model, preprocess, tok, ims, txt)
        finetune(model, pixels, tokens, ent.tolist(), FinetuneConfig(steps=finetune_steps, lr=1e-4, modality=modality,
                                                                     batch_entities=16, per_entity=4, seed=seed))
    grid = np.round(np.arange(0.30, 0.995, 0.01), 2)
    ims, txt, ent = emoji_records("val", seed + 1000, VAL_ENTITIES)
    z = embed_records(model, *_embed(model, preprocess, tok, ims, txt), modality=modality)
    best = max(grid, key=lambda t: adjusted_rand_index(ent, link(z, method, float(t))))
    ims, txt, ent = emoji_records("test", seed + 2000, max_entities)
    z = embed_records(model, *_embed(model, preprocess, tok, ims, txt), modality=modality)
    pred = link(z, method, float(best))
    m = pairwise_linkage_metrics(ent, pred)
    return {"f1": m["f1"], "precision": m["precision"], "recall": m["recall"], "ari": adjusted_rand_index(ent, pred),
            "threshold": float(best), "records": int(len(ent)), "entities": int(len(set(ent.tolist())))}


def linkage_arm(seed: int, steps: int, batch: int, eval_size: int, modality: str = "pooled",
                finetune_steps: int = 0, method: str = "nn") -> dict:
    """Fidelity plug-in: linkage of the noisy emoji test records (see :func:`linkage`)."""
    out = linkage(seed, steps, batch, modality, finetune_steps, method, max_entities=eval_size)
    return {k: out[k] for k in linkage_arm.metrics}


linkage_arm.metrics = ("f1", "ari", "precision", "recall")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["retrieval", "linkage"])
    ap.add_argument("--corpus", default="emoji")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--finetune-steps", type=int, default=0)
    ap.add_argument("--method", default="nn", choices=["nn", "cluster"])
    args = ap.parse_args()
    rows = {}
    if args.what == "retrieval":
        for index in ("image", "describe"):
            rows[index] = retrieval(args.corpus, args.seed, args.steps, args.batch, index)
    else:
        for modality in ("image", "text", "pooled"):
            rows[modality] = linkage(args.seed, args.steps, args.batch, modality, args.finetune_steps, args.method)
    json.dump(rows, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
