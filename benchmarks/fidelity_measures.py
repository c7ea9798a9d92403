"""The built-in measures of the fidelity runner (``benchmarks/fidelity.py``): what a recipe's ``measures`` list can
name besides ``module:function`` plug-ins. Each takes a trained model and the evaluation size and returns named numbers
computed on held-out ``shapes`` splits (sampled with ``EVAL_SEED``; training data use data seed 0).

They live apart from the runner so that the code-change check can tell them apart: a run records the files whose
functions it executed, and the runner's own file (its bookkeeping and report) is not one of them."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

EVAL_SEED = 12345  # held-out evaluation samples (the training data use data seed 0)


def _shapes(model, eval_size: int) -> dict:
    from clipforge.evaluation import evaluate_shapes
    from clipforge.tokenizer import get_tokenizer

    ev = evaluate_shapes(model, get_tokenizer(model.context_length), size=eval_size, seed=EVAL_SEED)
    zs, rt = ev["zero_shot"], ev["retrieval"]["val"]
    return {"object_top1": zs["object"]["top1"], "shape_top1": zs["shape"]["top1"], "color_top1": zs["color"]["top1"],
            "count_top1": zs["count"]["top1"], "i2t_R@1": rt["i2t_R@1"], "t2i_R@1": rt["t2i_R@1"]}


def split_features(model, split: str, size: int):
    """Images, first captions and the dataset items of a held-out ``shapes`` split, encoded."""
    from clipforge.data import build_dataset
    from clipforge.evaluation import encode_images, encode_texts
    from clipforge.tokenizer import get_tokenizer

    ds = build_dataset("shapes", split=split, size=size, seed=EVAL_SEED, image_size=model.image_size)
    items = [ds[i] for i in range(size)]
    tok = get_tokenizer(model.context_length)
    img = encode_images(model, [it["image"] for it in items])
    txt = encode_texts(model, [it["captions"][0] for it in items], tok)
    return img, txt, items, tok


def _gap(model, eval_size: int) -> dict:
    """Modality gap, true-pair cosine, uniformity and alignment of the ``val`` embeddings."""
    import torch

    from clipforge.evaluation.diagnostics import alignment, modality_gap, uniformity

    img, txt, _, _ = split_features(model, "val", eval_size)
    return {"gap": modality_gap(img, txt), "pos_cos": float((img * txt).sum(-1).mean()),
            "uniformity": uniformity(torch.cat([img, txt])), "alignment": alignment(img, txt)}


def _counting(model, eval_size: int) -> dict:
    """CountBench-style choice among the four captions "N <color> <shape>s." of each ``counting`` image."""
    import torch

    from clipforge.evaluation import encode_texts
    from clipforge.evaluation.compositionality import count_choice_accuracy

    img, _, items, tok = split_features(model, "counting", eval_size)
    captions, truth = [], []
    for it in items:  # the true caption (first template) among its counterfactuals, ordered by count
        n = it["labels"]["count"]  # count - 1
        wrong = list(it["negatives"]["count"])
        captions.append(wrong[:n] + [it["captions"][0]] + wrong[n:])
        truth.append(n)
    feats = encode_texts(model, [c for row in captions for c in row], tok).view(len(items), 4, -1)
    return {"count_choice": count_choice_accuracy(img, feats, torch.tensor(truth))["accuracy"]}


def _preference(model, split: str, kinds: tuple[str, ...], eval_size: int) -> dict:
    from clipforge.evaluation import encode_texts
    from clipforge.evaluation.compositionality import negative_preference

    img, pos, items, tok = split_features(model, split, eval_size)
    negs = [{k: encode_texts(model, it["negatives"][k], tok) for k in kinds if it["negatives"].get(k)} for it in items]
    return {k: v["accuracy"] for k, v in negative_preference(img, pos, negs)["per_type"].items()}


def _hardneg(model, eval_size: int) -> dict:
    """How often the true caption beats a typed hard negative (SugarCrepe protocol) on held-out splits."""
    comp = _preference(model, "compositional", ("color", "shape"), eval_size)
    rel = _preference(model, "relations", ("relation", "swap"), eval_size)
    return {"comp_color": comp["color"], "comp_shape": comp["shape"], "rel_relation": rel["relation"],
            "rel_swap": rel["swap"]}


@dataclasses.dataclass(frozen=True)
class Measure:
    fn: Callable[[Any, int], dict]
    metrics: tuple[str, ...]


MEASURES: dict[str, Measure] = {
    "shapes": Measure(_shapes, ("object_top1", "shape_top1", "color_top1", "count_top1", "i2t_R@1", "t2i_R@1")),
    "gap": Measure(_gap, ("gap", "pos_cos", "uniformity", "alignment")),
    "counting": Measure(_counting, ("count_choice",)),
    "hardneg": Measure(_hardneg, ("comp_color", "comp_shape", "rel_relation", "rel_swap")),
}
