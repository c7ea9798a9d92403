"""Fit adapters on a dataset's few-shot split and compare them with zero-shot on held-out data.

``run_adaptation(model, tokenizer, AdaptConfig(...))`` is what ``clipforge adapt`` and
``benchmarks/bench_adapt.py`` run. The data are the evaluation suite's probe splits
(:meth:`~clipforge.evaluation.suite_data.ShapesSuiteData.probe_splits`): k-shot support sets
drawn from ``train`` (one draw per seed), alpha/beta selection on ``val`` (the even half of
``val``'s labelled images), accuracy on ``test`` (the odd half, never used for fitting or
selection) and, for ``shapes``, on ``heldout`` (the ``compositional`` split: color-shape pairs
the model never saw in pre-training). Image features are computed once with the frozen
image tower (through the suite's embedding cache); no method augments images.

Methods (``METHODS``): ``tip`` (training-free Tip-Adapter), ``tip-f`` (Tip-Adapter-F), ``coop``
(CoOp), ``gda`` (GDA + zero-shot, alpha on val), ``clipn`` (learned "no" prompts; reports OOD
AUROC against the suite's OOD set instead of accuracy), ``tca`` (TCA token condensation,
test-time: no support set; each eval split is streamed through the condensed image tower in a
seeded random order per seed, results under ``results["test_time"]["tca"]``), ``comclip``
(ComCLIP, training-free compositional matching: on ``shapes``' ``relations`` split, how often
the true caption beats its relation-flipped and subject/object-swapped negatives, ComCLIP vs plain
CLIP, under ``results["compositional"]["comclip"]``; no support set), ``caps`` (CapS-Adapter: the
support images' captions, not the images, are the cache keys; alpha/beta on val), ``tmm`` (TMM:
class-aware image-conditioned prompts and text-guided feature tuning on CoOp's context) and
``gopro`` (GOPro: generated prompts and projectors trained with CLIP, view-contrastive and
prompt-consistency losses; the one method that augments images: ``gopro.views`` augmented views
of each support image are encoded once). Zero-shot is always reported.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..adapt.clipn import CLIPNConfig, fit_clipn
from ..adapt.comclip import ComCLIP, ComCLIPConfig, swap_accuracy
from ..adapt.common import FeatureSet
from ..adapt.coop import CoOpConfig, fit_coop
from ..adapt.gda import gda_logits
from ..adapt.gopro import GOProConfig, encode_views, fit_gopro
from ..adapt.tca import TCAConfig, run_stream
from ..adapt.tip_adapter import (
    TipAdapterFConfig,
    TipSearch,
    caption_support,
    fit_caps_adapter,
    fit_tip_adapter,
    fit_tip_adapter_f,
)
from ..adapt.tmm import TMMConfig, fit_tmm
from ..metrics import mcm_score, ood_metrics, top1
from .cache import EmbeddingCache
from .linear_probe import k_shot_indices
from .suite import Context
from .suite_data import suite_data

logger = logging.getLogger(__name__)

METHODS = ("tip", "tip-f", "coop", "gda", "clipn", "tca", "comclip", "caps", "tmm", "gopro")
NO_SUPPORT = ("tca", "comclip")  # methods without a support set


@dataclass
class AdaptConfig:
    """What to fit and where. ``view``: the label view (None: the dataset's default, ``shape``
    on shapes). ``shots``: support images per class; ``seeds``: one support draw each (the
    reported number is the mean over seeds)."""

    dataset: str = "shapes"
    view: str | None = None
    methods: tuple[str, ...] = ("tip", "tip-f", "coop", "gda")
    shots: tuple[int, ...] = (16,)
    seeds: tuple[int, ...] = (0,)
    size: int = 500
    data_seed: int = 12345
    data_root: str | None = None
    cache_dir: str | None = None
    tip: TipSearch = field(default_factory=TipSearch)
    tip_f: TipAdapterFConfig = field(default_factory=TipAdapterFConfig)
    coop: CoOpConfig = field(default_factory=CoOpConfig)
    tmm: TMMConfig = field(default_factory=TMMConfig)
    gopro: GOProConfig = field(default_factory=GOProConfig)
    clipn: CLIPNConfig = field(default_factory=CLIPNConfig)
    tca: TCAConfig = field(default_factory=TCAConfig)
    tca_batch_size: int = 1  # test images per TCA step (the paper streams one at a time)
    comclip: ComCLIPConfig = field(default_factory=ComCLIPConfig)
    comclip_size: int = 200  # relation scenes ComCLIP is scored on (shapes' relations split)

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown adaptation methods {unknown}; choose from {', '.join(METHODS)}")
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"shots must be positive integers, got {self.shots}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")


def _mean(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def run_adaptation(model, tokenizer: Callable, cfg: AdaptConfig | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit every method of ``cfg`` for every (shots, seed) and return ``(results, adapters)``:
    plain-number results (JSON) and the fitted adapters of the last (shots, seed) per method
    (tensors to save). Progress goes to this module's logger (INFO)."""
    cfg = cfg or AdaptConfig()
    model.eval()
    data = suite_data(cfg.dataset, model.image_size, cfg.size, cfg.data_seed, cfg.data_root)
    ctx = Context(model, tokenizer, data, EmbeddingCache(model, cfg.cache_dir))
    view = cfg.view or data.default_view
    tr, va, te, held = data.probe_splits(view)
    classes = len(tr.classnames)
    cls = ctx.classifier(tr.classnames, tr.templates)
    scale = ctx.scale

    def features(lab) -> FeatureSet:
        f = ctx.images(lab.images, lab.spec)
        return FeatureSet(f, scale * f @ cls.t(), lab.labels)

    t0 = time.perf_counter()
    ftr, val = ctx.images(tr.images, tr.spec), features(va)
    evals = {"test": features(te)} | ({"heldout": features(held)} if held is not None else {})
    logger.info("encoded %d train, %d val, %s images in %.1f s", len(tr.images), len(val),
                ", ".join(f"{len(v)} {k}" for k, v in evals.items()), time.perf_counter() - t0)

    def accuracy(logits_fn) -> dict[str, float]:
        with torch.no_grad():
            return {name: top1(logits_fn(fs), fs.labels) for name, fs in evals.items()}

    results: dict[str, Any] = {
        "dataset": cfg.dataset, "view": view, "classnames": list(tr.classnames), "num_classes": classes,
        "chance": 1.0 / classes, "logit_scale": scale,
        "n": {"train_pool": len(tr.images), "val": len(val)} | {k: len(v) for k, v in evals.items()},
        "zero_shot": accuracy(lambda fs: fs.zero_shot_logits) | {"val": top1(val.zero_shot_logits, val.labels)},
        "shots": {}, "config": _config_dict(cfg),
    }
    adapters: dict[str, Any] = {}
    ood = None
    if "clipn" in cfg.methods:
        s = data.ood_set() if not data.unsupported("ood") else None
        if s is None:
            results["ood"] = {"skipped": data.unsupported("ood")}
        else:
            ood_cls = ctx.classifier(s.classnames, s.templates)
            ood = (ctx.images(s.in_images, s.in_spec), ctx.images(s.out_images, s.out_spec), ood_cls, s)
            results["ood"] = {
                "in": s.in_spec,
                "out": s.out_spec,
                "mcm": ood_metrics(mcm_score(ood[0], ood_cls).numpy(), mcm_score(ood[1], ood_cls).numpy()),
            }
    if "tca" in cfg.methods:
        results["test_time"] = {
            "tca": _run_tca(model, cls, scale, {"test": te} | ({"heldout": held} if held is not None else {}), cfg)
        }
    if "comclip" in cfg.methods:
        results["compositional"] = {"comclip": _run_comclip(model, tokenizer, cfg)}
    shot_methods = [m for m in cfg.methods if m not in NO_SUPPORT]
    for k in cfg.shots if shot_methods else ():
        per_method: dict[str, list[dict]] = {m: [] for m in shot_methods}
        for seed in cfg.seeds:
            idx = torch.from_numpy(k_shot_indices(tr.labels.numpy(), k, seed=seed))
            sup, sup_y = ftr[idx], tr.labels[idx]
            support = FeatureSet(sup, scale * sup @ cls.t(), sup_y)
            for method in shot_methods:
                t = time.perf_counter()
                run: dict[str, Any] = {"seed": seed}
                if method == "tip":
                    a = fit_tip_adapter(sup, sup_y, classes, val, cfg.tip)
                    run |= accuracy(lambda fs: a(fs.features, fs.zero_shot_logits)) | {"alpha": a.alpha, "beta": a.beta}
                    adapters[method] = a.state_dict() | {"alpha": a.alpha, "beta": a.beta}
                elif method == "tip-f":
                    a, hist = fit_tip_adapter_f(sup, sup_y, classes, support, val, cfg.tip_f)
                    run |= accuracy(lambda fs: a(fs.features, fs.zero_shot_logits))
                    run |= {"alpha": a.alpha, "beta": a.beta, "init_alpha": hist["init_alpha"],
                            "init_beta": hist["init_beta"], "final_loss": hist["loss"][-1] if hist["loss"] else None}
                    adapters[method] = a.state_dict() | {"alpha": a.alpha, "beta": a.beta}
                elif method == "gda":
                    g_val = gda_logits(val.features, sup, sup_y, classes)
                    alpha = max(
                        cfg.tip.alphas, key=lambda al: (top1(val.zero_shot_logits + al * g_val, val.labels), -al)
                    )
                    run |= accuracy(
                        lambda fs: fs.zero_shot_logits + alpha * gda_logits(fs.features, sup, sup_y, classes)
                    )
                    run["alpha"] = alpha
                elif method == "coop":
                    learner, hist = fit_coop(model, tokenizer, tr.classnames, sup, sup_y, cfg.coop)
                    w = learner.classifier()
                    run |= accuracy(lambda fs: scale * fs.features @ w.t())
                    run |= {"final_loss": hist["loss"][-1], "train_top1": hist["train_top1"]}
                    adapters[method] = {"ctx": learner.ctx.detach().clone(), "classifier": w,
                                        "prompt_ids": learner.ids.clone(), "n_ctx": learner.n_ctx}
                elif method == "caps":
                    if not tr.captions:
                        run["skipped"] = f"{cfg.dataset}'s train split has no captions for CapS-Adapter's cache"
                    else:
                        texts, cap_y = caption_support(tr.captions, tr.labels, idx.tolist())
                        a = fit_caps_adapter(ctx.texts(texts), cap_y, classes, val, cfg.tip)
                        run |= accuracy(lambda fs: a(fs.features, fs.zero_shot_logits))
                        run |= {"alpha": a.alpha, "beta": a.beta, "captions": len(texts)}
                        adapters[method] = a.state_dict() | {"alpha": a.alpha, "beta": a.beta}
                elif method == "tmm":
                    learner, hist = fit_tmm(model, tokenizer, tr.classnames, sup, sup_y, cfg.tmm)
                    run |= accuracy(lambda fs: learner.logits(fs.features))
                    run |= {"final_loss": hist["loss"][-1], "train_top1": hist["train_top1"]}
                    adapters[method] = {k: v.detach().clone() for k, v in learner.state_dict().items()}
                elif method == "gopro":
                    views = encode_views(model, [tr.images[i] for i in idx.tolist()], cfg.gopro, seed=seed)
                    learner, hist = fit_gopro(model, tokenizer, tr.classnames, views, sup_y, cfg.gopro)
                    run |= accuracy(lambda fs: learner.logits(fs.features))
                    run |= {k: hist[k] for k in ("final_clip", "final_view", "final_consistency", "train_top1")}
                    run["final_loss"] = hist["loss"][-1]
                    adapters[method] = {k: v.detach().clone() for k, v in learner.state_dict().items()}
                elif method == "clipn" and ood is not None:
                    fin, fout, ood_cls, s = ood
                    no, hist = fit_clipn(model, tokenizer, s.classnames, ood_cls, sup, sup_y, cfg.clipn)
                    sin, sout = no.scores(fin), no.scores(fout)
                    for score in ("ctw", "atd"):
                        run[f"auroc_{score}"] = ood_metrics(sin[score].numpy(), sout[score].numpy())["auroc"]
                        run[f"fpr95_{score}"] = ood_metrics(sin[score].numpy(), sout[score].numpy())["fpr95"]
                    run |= {"train_p_no_own": hist["train_p_no_own"], "train_p_no_other": hist["train_p_no_other"]}
                    adapters[method] = {"ctx": no.learner.ctx.detach().clone(), "no_embeddings": no.no,
                                        "yes_embeddings": no.yes, "temperature": no.temperature}
                run["seconds"] = time.perf_counter() - t
                per_method[method].append(run)
                logger.info("%d-shot seed %d %s: %s", k, seed, method, ", ".join(
                    f"{key} {v:.3f}" for key, v in run.items() if isinstance(v, float) and key != "seconds"))
        results["shots"][str(k)] = {
            m: {
                key: _mean(runs, key)
                for key in runs[0]
                if key not in ("seed",) and isinstance(runs[0][key], (int, float))
            }
            | {"runs": runs}
            | ({"skipped": runs[0]["skipped"]} if "skipped" in runs[0] else {})
            for m, runs in per_method.items()
            if runs
        }
    return results, adapters


def _run_tca(model, classifier, scale: float, splits: dict, cfg: AdaptConfig) -> dict[str, Any]:
    """TCA over each split's images as a test stream, one seeded random order per seed; the
    reservoir starts empty for every split and seed."""
    runs = []
    for seed in cfg.seeds:
        run: dict[str, Any] = {"seed": seed}
        for name, lab in splits.items():
            order = torch.randperm(len(lab.images), generator=torch.Generator().manual_seed(seed))
            out = run_stream(model, classifier, lab.images, cfg.tca, cfg.tca_batch_size, order, scale)
            run[name] = top1(out["logits"], lab.labels)
            run[f"{name}_uncorrected"] = top1(out["base_logits"], lab.labels)
            run[f"{name}_images_per_second"] = out["images_per_second"]
            flops = out["flops"]
        runs.append(run)
        logger.info("tca seed %d: %s", seed, ", ".join(f"{k} {v:.3f}" for k, v in run.items() if isinstance(v, float)))
    mean = {key: _mean(runs, key) for key in runs[0] if key != "seed"}
    return mean | {
        "gflops_plain": flops["gflops_plain"],
        "gflops_tca": flops["gflops_tca"],
        "gflops_saved": flops["saved"],
        "runs": runs,
    }


def _run_comclip(model, tokenizer, cfg: AdaptConfig) -> dict[str, Any]:
    """ComCLIP vs plain CLIP on ``cfg.comclip_size`` scenes of shapes' ``relations`` split (seed ``cfg.data_seed``)."""
    if cfg.dataset != "shapes":
        return {"skipped": f"ComCLIP is scored on shapes' relations split (boxes and swap negatives); "
                           f"dataset {cfg.dataset} has neither"}
    from ..data.shapes import ShapesGenerator

    gen = ShapesGenerator("relations", seed=cfg.data_seed, image_size=model.image_size)
    t0 = time.perf_counter()
    out = swap_accuracy(ComCLIP(model, tokenizer, cfg.comclip), [gen.sample(i) for i in range(cfg.comclip_size)])
    logger.info("comclip on %d relation scenes in %.1f s: %s", cfg.comclip_size, time.perf_counter() - t0,
                ", ".join(f"{k} {v:.3f}" for k, v in out.items()))
    return out | {"n": cfg.comclip_size, "weighting": cfg.comclip.weighting}


def _config_dict(cfg: AdaptConfig) -> dict:
    d = asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
