"""GRAIN's test-time zero-shot recognition: class scores from the image-caption score and the class descriptions
grounded in the image's regions.

"Grounding Descriptions in Images informs Zero-Shot Visual Recognition" (GRAIN, 2024): at inference each class c
has the usual prompt-ensembled embedding w_c and a set of descriptions D_c; the image has its global embedding x
and the Q region embeddings e_q of its region tokens (those the ``grain`` loss term trains). With every embedding
normalized, alpha in [0, 1] and u_k a description's embedding,

    desc_c(x) = 1/Q sum_q max_{k in D_c} e_q . u_k          each region token's best-matching description of c
    score_c(x) = alpha * x . w_c + (1 - alpha) * desc_c(x)

as in GRAIN's evaluation code (``our_eval.py``: max over a class's descriptions, mean over the queries, alpha
times the image-class similarity plus 1 - alpha times that). Simplified, stated: the descriptions of a ``shapes``
class are the region captions every object of the class can have (:func:`clipforge.data.shapes.class_descriptions`,
"a small red circle." and "a large red circle." for "red circle"), not an LLM's; w_c is the plain template
ensemble (GRAIN's code can also append the descriptions to the templates; that option is not here); alpha is an
argument, not tuned on the test set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import build_composite
from ..losses.grain import GrainLoss, RegionTokens
from ..metrics import top1
from .features import encode_image_tokens, encode_images, encode_texts
from .zero_shot import zero_shot_classifier


def description_scores(regions: Tensor, descriptions: Sequence[Tensor]) -> Tensor:
    """desc_c [N, C] (module docstring) for normalized region embeddings [N, Q, d] and, per class, its normalized
    description embeddings [n_c, d]."""
    if not descriptions or any(u.ndim != 2 or u.shape[0] == 0 for u in descriptions):
        raise ValueError("every class needs at least one description embedding [n_c, d]")
    return torch.stack([(regions @ u.t()).amax(-1).mean(-1) for u in descriptions], dim=1)


def check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"GRAIN's alpha weighs the image-class score against the description score and must be in "
                         f"[0, 1], got {alpha}")
    return alpha


def grain_scores(global_similarity: Tensor, desc: Tensor, alpha: float) -> Tensor:
    """score_c = alpha * x . w_c + (1 - alpha) * desc_c, both [N, C]."""
    return check_alpha(alpha) * global_similarity + (1.0 - alpha) * desc


@torch.no_grad()
def region_embeddings(model, tokens: RegionTokens, images: Sequence, batch_size: int = 64) -> Tensor:
    """The normalized embeddings [N, Q, d] of the region tokens ``tokens`` over the images' projected patch tokens."""
    patches = encode_image_tokens(model, images, batch_size)
    if patches.shape[-1] != tokens.queries.shape[-1]:
        raise ValueError(f"the region tokens were trained for {tokens.queries.shape[-1]}-dimensional patch tokens but "
                         f"this model's have {patches.shape[-1]}: use the model of the same training run")
    was_training = tokens.training
    tokens.eval()
    out = torch.cat([tokens.float()(patches[i:i + batch_size])[0] for i in range(0, len(patches), batch_size)])
    tokens.train(was_training)
    return out


@torch.no_grad()
def grain_class_scores(model, tokens: RegionTokens, images: Sequence, classnames: Sequence[str],
                       templates: Sequence[str], descriptions: Sequence[Sequence[str]], tokenizer: Callable,
                       alpha: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """(score_c, x . w_c, desc_c), each [N, C], of ``images`` for the classes (module docstring)."""
    if len(descriptions) != len(classnames):
        raise ValueError(f"{len(classnames)} classes but {len(descriptions)} description lists: give one list per "
                         "class")
    image = F.normalize(encode_images(model, images), dim=-1)
    glob = image @ zero_shot_classifier(model, classnames, templates, tokenizer).t()
    desc = description_scores(region_embeddings(model, tokens, images),
                              [F.normalize(encode_texts(model, list(d), tokenizer), dim=-1) for d in descriptions])
    return grain_scores(glob, desc, alpha), glob, desc


def grain_zero_shot(model, tokens: RegionTokens, images: Sequence, labels: Tensor, classnames: Sequence[str],
                    templates: Sequence[str], descriptions: Sequence[Sequence[str]], tokenizer: Callable,
                    alpha: float = 0.5) -> dict:
    """Top-1 of GRAIN's score (``top1``), of the image-class score alone (``global_top1``, plain zero-shot) and of
    the description score alone (``description_top1``) on ``images`` with ``labels``."""
    score, glob, desc = grain_class_scores(model, tokens, images, classnames, templates, descriptions, tokenizer,
                                           alpha)
    return {"top1": top1(score, labels), "global_top1": top1(glob, labels), "description_top1": top1(desc, labels),
            "alpha": alpha}


def evaluate_grain_shapes(model, tokens: RegionTokens, tokenizer: Callable, size: int = 500, seed: int = 12345,
                          alpha: float = 0.5, views: Sequence[str] = ("object", "shape", "color")) -> dict:
    """:func:`grain_zero_shot` on the suite's ``shapes`` classification views (the held-out color-shape pairs of
    the ``compositional`` split, single objects: the images and classes of the ``zero_shot`` task), each class
    described by :func:`clipforge.data.shapes.class_descriptions`."""
    from ..data.shapes import class_descriptions
    from .suite_data import suite_data

    data = suite_data("shapes", model.image_size, size, seed)
    out = {}
    for view in views:
        lab = data.labelled(view)
        out[view] = grain_zero_shot(model, tokens, lab.images, lab.labels, lab.classnames, lab.templates,
                                    class_descriptions(view), tokenizer, alpha)
    return out


def load_region_tokens(checkpoint: str | Path) -> RegionTokens:
    """The trained region tokens of the ``grain`` term of a training checkpoint (``checkpoints/step_N``: its
    ``config.yaml`` names the term's options, its ``state.pt`` holds the loss terms' weights), or of a run
    directory's newest checkpoint."""
    import yaml

    ckpt = Path(checkpoint)
    if (ckpt / "checkpoints").is_dir():  # a run directory: its newest checkpoint
        found = sorted((ckpt / "checkpoints").glob("step_*"))
        ckpt = found[-1] if found else ckpt
    config, state = ckpt / "config.yaml", ckpt / "state.pt"
    if not config.exists() or not state.exists():
        raise ValueError(f"{ckpt} is not a training checkpoint (config.yaml and state.pt); give a checkpoints/step_N "
                         "directory of a run that trained the grain term")
    spec = (yaml.safe_load(config.read_text()) or {}).get("loss") or {}
    grain = {name: value for name, value in spec.items()
             if name == "grain" or (isinstance(value, dict) and value.get("term") == "grain")}
    loss_state = torch.load(state, map_location="cpu", weights_only=True).get("loss_terms")
    if not grain or loss_state is None:
        raise ValueError(f"the run of {ckpt} did not train the grain term (its loss: {sorted(spec)}), so it has no "
                         "region tokens; train with loss including grain")
    name = next(iter(grain))
    composite = build_composite({name: grain[name]})
    prefix = f"terms.{name}."
    composite.load_state_dict({k: v for k, v in loss_state.items() if k.startswith(prefix)})
    term = composite.terms[name]
    if not isinstance(term, GrainLoss):
        raise ValueError(f"the loss term '{name}' of {ckpt} is not GRAIN's; it has no region tokens")
    return term.tokens.eval()
