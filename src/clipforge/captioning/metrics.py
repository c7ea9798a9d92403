"""Caption metrics: CLIP-S and RefCLIP-S (Hessel et al., 2021, "CLIPScore: A Reference-free Evaluation
Metric for Image Captioning"), BLEU-4 (Papineni et al., 2002) and CIDEr-D (Vedantam et al., 2015).

CLIP-S (Hessel Eq. 1) for a caption embedding c and an image embedding v, w = 2.5::

    CLIP-S(c, v) = w * max(cos(c, v), 0)

RefCLIP-S (Hessel Eq. 2) with reference caption embeddings R::

    RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_{r in R} cos(c, r), 0))

A corpus score is the mean of the per-caption scores. Hessel et al. prefix each caption with
"A photo depicts"; :func:`clip_scores_for_texts` takes that prefix as ``prompt`` (default none, because
the shapes captions the small models here are trained on have no such prefix).

BLEU-4 and CIDEr-D are implemented here: ``pycocoevalcap`` (the reference implementation) is not
installable offline on these machines and ``nltk`` (BLEU only, no CIDEr-D) is not a clipforge
dependency. Both follow the coco-caption definitions on lower-cased word tokens (``[a-z0-9]+``; the
coco-caption PTB tokenizer also drops punctuation):

- BLEU-4, corpus level: modified n-gram precisions p_n (clipped counts summed over the corpus),
  ``BLEU = BP * exp(mean_n log p_n)`` for n = 1..4, ``BP = min(1, exp(1 - r / c))`` with c the total
  candidate length and r the total of the reference lengths closest to each candidate's length (ties:
  the shorter). A zero precision gives 0 (no smoothing).
- CIDEr-D: per n-gram order n = 1..4, TF-IDF vectors ``g(x)_k = tf_k(x) * log(N / max(1, df_k))``
  (N images, df_k the number of images whose references contain n-gram k); for a candidate c and
  reference r, ``sim_n = sum_k min(g(c)_k, g(r)_k) g(r)_k / (|g(c)| |g(r)|) * exp(-(l_c - l_r)^2 / (2 sigma^2))``
  with sigma = 6 and l the word length; ``CIDEr-D = 10 * mean_n mean_r sim_n``; the corpus score is
  the mean over images. (coco-caption measures l as the bigram count, which differs only for
  one-word captions.)

Degenerate captions (what Cho et al. 2022 report of SCST with CLIP-S alone): :func:`is_repetitive` flags a
caption whose word tokens hold a word or a 2-word span repeated back to back ("circle circle", "red circle red
circle", "with a with a"); :func:`repetition_rate` is the share of such captions. A surface test, not the paper's
human fluency judgment; none of 1,525 shapes val captions (seed 12345, 500 scenes) is flagged, whereas counting
any bigram seen twice would flag 6.6 % of them ("an orange hexagon left of an orange circle").
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

CLIP_S_WEIGHT = 2.5


def clip_s(caption_features: Tensor, image_features: Tensor, w: float = CLIP_S_WEIGHT) -> Tensor:
    """Per-pair CLIP-S [N] of row-aligned caption and image embeddings [N, d] (normalized here)."""
    c = torch.nn.functional.normalize(caption_features.float(), dim=-1)
    v = torch.nn.functional.normalize(image_features.float(), dim=-1)
    return w * (c * v).sum(-1).clamp(min=0)


def ref_clip_s(caption_features: Tensor, image_features: Tensor, reference_features: Sequence[Tensor],
               w: float = CLIP_S_WEIGHT) -> Tensor:
    """Per-pair RefCLIP-S [N]; ``reference_features[i]`` holds the [R_i, d] reference embeddings of pair i."""
    if len(reference_features) != caption_features.shape[0]:
        raise ValueError(f"{caption_features.shape[0]} captions but {len(reference_features)} reference sets; "
                         "give one set (>= 1 reference) per caption")
    clip_part = clip_s(caption_features, image_features, w)
    c = torch.nn.functional.normalize(caption_features.float(), dim=-1)
    ref_part = torch.stack([
        (torch.nn.functional.normalize(r.float(), dim=-1) @ c[i]).max().clamp(min=0) if len(r) else _no_refs(i)
        for i, r in enumerate(reference_features)])
    total = clip_part + ref_part
    return torch.where(total > 0, 2 * clip_part * ref_part / total.clamp(min=1e-12), torch.zeros_like(total))


def _no_refs(i: int) -> Tensor:
    raise ValueError(f"caption {i} has no reference captions; RefCLIP-S needs at least one "
                     "(use CLIP-S without references)")


@torch.no_grad()
def clip_scores_for_texts(model, images: Tensor, captions: Sequence[str],
                          references: Sequence[Sequence[str]] | None = None,
                          prompt: str = "", batch_size: int = 256) -> dict[str, float]:
    """Mean CLIP-S (and RefCLIP-S when ``references`` are given) of ``captions`` for preprocessed ``images``
    under a clipforge CLIP; ``prompt`` is put before each caption (Hessel et al. use "A photo depicts ")."""
    from ..tokenizer import get_tokenizer

    if len(captions) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions; give one caption per image")
    tok = get_tokenizer(model.context_length)
    enc = lambda texts: torch.cat([model.encode_text(tok([prompt + t for t in texts[i : i + batch_size]])).float()
                                   for i in range(0, len(texts), batch_size)])
    img = torch.cat([model.encode_image(images[i : i + batch_size]).float() for i in range(0, len(images), batch_size)])
    cap = enc(list(captions))
    out = {"clip_s": float(clip_s(cap, img).mean())}
    if references is not None:
        refs = [enc(list(r)) for r in references]
        out["ref_clip_s"] = float(ref_clip_s(cap, img, refs).mean())
    return out


def words(text: str) -> list[str]:
    """Lower-cased word tokens ``[a-z0-9]+`` (punctuation dropped)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU-``max_n`` (module docstring)."""
    _check(candidates, references)
    matched, total = [0] * max_n, [0] * max_n
    c_len = r_len = 0
    for cand, refs in zip(candidates, references):
        c, rs = words(cand), [words(r) for r in refs]
        c_len += len(c)
        r_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(c, n)
            best: Counter = Counter()
            for r in rs:
                best |= _ngrams(r, n)  # the maximum count of each n-gram over the references
            matched[n - 1] += sum(min(k, best[g]) for g, k in counts.items())
            total[n - 1] += sum(counts.values())
    if c_len == 0 or any(m == 0 for m in matched):
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matched, total)) / max_n
    bp = 1.0 if c_len > r_len else math.exp(1 - r_len / c_len)
    return bp * math.exp(log_p)


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-image CIDEr-D) (module docstring)."""
    _check(candidates, references)
    refs = [[words(r) for r in rs] for rs in references]
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for n in range(1, max_n + 1) for g in _ngrams(r, n)})
    log_n = math.log(float(len(refs)))

    def vec(tokens):
        out = []
        for n in range(1, max_n + 1):
            v = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in _ngrams(tokens, n).items()}
            out.append((v, math.sqrt(sum(x * x for x in v.values()))))
        return out

    scores = []
    for cand, rs in zip(candidates, refs):
        c = words(cand)
        vc = vec(c)
        total = 0.0
        for r in rs:
            vr = vec(r)
            penalty = math.exp(-((len(c) - len(r)) ** 2) / (2 * sigma**2))
            for (gc, nc), (gr, nr) in zip(vc, vr):
                dot = sum(min(x, gr.get(g, 0.0)) * gr.get(g, 0.0) for g, x in gc.items())
                total += (dot / (nc * nr) if nc and nr else dot) * penalty
        scores.append(10.0 * total / max_n / len(rs))
    return sum(scores) / len(scores), scores


def is_repetitive(caption: str) -> bool:
    """Whether the caption repeats a word or a 2-word span back to back (module docstring)."""
    toks = words(caption)
    return any(toks[i:i + n] == toks[i + n:i + 2 * n] for n in (1, 2) for i in range(len(toks) - 2 * n + 1))


def repetition_rate(captions: Sequence[str]) -> float:
    """The share of ``captions`` for which :func:`is_repetitive` holds."""
    if not captions:
        raise ValueError("repetition_rate needs at least one caption")
    return sum(map(is_repetitive, captions)) / len(captions)


def _check(candidates, references):
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"{len(candidates)} candidates and {len(references)} reference sets: give one non-empty set "
                         "of references per candidate (and at least one candidate)")
    if any(len(r) == 0 for r in references):
        raise ValueError("a candidate has no reference captions; BLEU and CIDEr-D need at least one per candidate")
