"""``clipforge adapt``: fit a few-shot adapter on a trained CLIP and report accuracy before/after.

    clipforge adapt runs/a --method tip-f --shots 16 --out runs/a/adapt
    clipforge adapt runs/a --method tip tip-f coop gda --shots 1 4 16 --seeds 0 1 2
    clipforge adapt runs/a --method tca --tca-keep-ratio 0.7
    clipforge adapt runs/a --method coop tmm gopro caps --shots 16 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_load_arguments, load_options
from .fp32_linear_option import add_fp32_linear_argument, fp32_linears

METHOD_HELP = """\
methods (--method, several allowed; 'all' runs every one):
  tip     Tip-Adapter (Zhang et al. 2022), training-free: a cache whose keys are the support
          images' features and values their labels; logits = zero-shot + alpha*exp(-beta(1-f.K))L,
          alpha and beta searched on the validation split.
  tip-f   Tip-Adapter-F: the same cache with the keys trained by cross-entropy (AdamW, 20 epochs),
          then alpha/beta searched again. At initialization it equals tip.
  coop    CoOp (Zhou et al. 2022): M learnable context vectors replace the template words before
          each class name in the text tower's input; only they train (SGD, cross-entropy on the
          support images), both towers stay frozen. --coop-class-specific gives each class its own.
  gda     GDA (Wang et al. 2024), training-free: a shared-covariance Gaussian classifier on the
          support features, added to the zero-shot logits (weight chosen on validation).
  clipn   CLIPN-style "no" prompts (Wang et al. 2023): learned prompts whose embedding says "this is
          not class c"; reports OOD-detection AUROC (shapes vs textures) next to MCM's, not accuracy.
  tca     TCA (Wang et al. 2025), token condensation as test-time adaptation: no support set. The
          test images stream through the image tower; at 1/4, 1/2, 3/4 of its depth the patch
          tokens the class token attends to least are pruned/fused and ambiguous ones merged into
          coreset centers (fewer GFLOPs); a reservoir of the most confident images' class tokens
          per class guides condensation (domain anchors) and corrects the logits. --shots is ignored.
  comclip ComCLIP (Jiang et al. 2023), training-free compositional matching: each caption is parsed into
          subject/predicate/object, entities are matched to sub-images (the scene's boxes, or connected
          components of non-background pixels), and the sub-image embeddings, weighted by their match with
          the entity words, are added to the global image embedding. Scored on shapes' relations split: how
          often the true caption beats its relation-flipped and swapped negatives, vs plain CLIP.
          --shots is ignored.
  caps    CapS-Adapter (Wang et al. 2024), training-free: the Tip-Adapter cache with the support images'
          captions (their text embeddings) as keys instead of the images; alpha and beta searched on
          validation. Skipped on a dataset whose train split has no captions.
  tmm     TMM (Long et al. 2023), on CoOp's context: class-aware prompts (each context token of class c
          shifted by a meta-net of the image feature times class c's embedding) and text-guided feature
          tuning (the image feature plus a learned map of its attention-weighted class-prompt features),
          trained with cross-entropy. Simplified: global image features, not the towers' tokens.
  gopro   GOPro (Singha et al. 2023): image-generated prompts (CoOp context + a meta-net of the image
          feature) and image/text projectors, trained with the CLIP loss, a view-contrastive loss and a
          prompt-consistency loss over --gopro-views augmented views of each support image (encoded once).

data (the evaluation suite's splits): support sets of K images per class drawn from 'train'
(one draw per --seeds value), hyper-parameters chosen on the even half of 'val', accuracy on
the odd half ('test') and, on shapes, on 'heldout' (color-shape pairs never seen in training).
Zero-shot (prompt-ensembled templates) is the 'before' number.

output: a table (mean over seeds; 'delta' = test accuracy minus zero-shot), --out DIR/adapt.json
(every run, the chosen alpha/beta, the config) and DIR/adapters.pt (the learned tensors: cache
keys, context vectors, "no" embeddings; torch.load(..., weights_only=True)).

examples:
  clipforge adapt runs/a --method tip-f --shots 16 --out runs/a/adapt
  clipforge adapt runs/a --method all --shots 1 4 16 --seeds 0 1 2 --json
  clipforge adapt runs/a --method coop --coop-ctx-init none --coop-n-ctx 8 --coop-epochs 200
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..evaluation.adaptation import METHODS

    p.epilog = METHOD_HELP
    p.add_argument("model", help="a run directory (its newest checkpoint), a checkpoint/model directory, or any source "
                                 "clipforge.load reads")
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (a GPU when there is one, else the CPU; default), cpu, cuda, "
                        "cuda:N or mps")
    add_fp32_linear_argument(p, "encoding and fitting the adapters (CoOp and its kin backpropagate through the "
                                "frozen text tower)")
    p.add_argument("--method", nargs="+", default=["tip-f"], choices=[*METHODS, "all"], metavar="METHOD",
                   help=f"one or more of {', '.join(METHODS)}, or all (default tip-f)")
    p.add_argument("--dataset", default="shapes",
                   help="shapes (default), a built corpus (openclipart, emoji), or shards with --data-root DIR: your "
                        "own labelled data converted by 'clipforge data convert SRC --out DIR --val-fraction 0.25 "
                        "--test-fraction 0.25' (support sets from train, selection on val, accuracy on test)")
    p.add_argument("--data-root", help="where the corpus was built (default $CLIPFORGE_DATA/NAME), or the shard "
                                       "directory of --dataset shards")
    p.add_argument("--view", help="label view to classify (default: the dataset's default, 'shape' on shapes)")
    p.add_argument(
        "--shots", nargs="+", type=int, default=[16], help="support images per class; several give a curve (default 16)"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="support-set draws to average over (default 0)")
    p.add_argument("--size", type=int, default=500, help="evaluation split size as in clipforge eval (default 500)")
    p.add_argument("--data-seed", type=int, default=12345, help="evaluation data seed (default 12345, not training's)")
    p.add_argument("--out", help="directory for adapt.json and adapters.pt (default: print only)")
    p.add_argument("--cache-dir", help="embedding cache (default: none, everything is encoded in memory)")
    g = p.add_argument_group("Tip-Adapter-F")
    g.add_argument(
        "--tip-f-epochs", type=int, default=20, help="training epochs over the support set (default 20, as the paper)"
    )
    g.add_argument("--tip-f-lr", type=float, default=1e-3, help="AdamW learning rate of the cache keys (default 1e-3)")
    g = p.add_argument_group("CoOp")
    g.add_argument("--coop-ctx-init", default="a picture of a",
                   help="phrase the context starts from (its token count is M), or 'none' for random N(0, 0.02) "
                        "vectors (default 'a picture of a')")
    g.add_argument(
        "--coop-n-ctx", type=int, default=4, help="M with --coop-ctx-init none (default 4; the paper uses 16)"
    )
    g.add_argument("--coop-class-specific", action="store_true", help="one context per class (CoOp's CSC)")
    g.add_argument("--coop-epochs", type=int, default=100, help="epochs after the warmup epoch (default 100)")
    g.add_argument("--coop-lr", type=float, default=2e-3, help="SGD learning rate (default 2e-3, as the paper)")
    g = p.add_argument_group("TMM and GOPro (their context and optimizer are CoOp's: --coop-ctx-init, --coop-lr, ...)")
    g.add_argument("--tmm-epochs", type=int, default=50, help="TMM epochs after the warmup epoch (default 50)")
    g.add_argument("--gopro-epochs", type=int, default=50, help="GOPro epochs after the warmup epoch (default 50)")
    g.add_argument("--gopro-views", type=int, default=4, help="augmented views encoded per support image (default 4)")
    g.add_argument("--gopro-view-weight", type=float, default=1.0,
                   help="weight of the view-contrastive loss (default 1)")
    g.add_argument("--gopro-consistency-weight", type=float, default=1.0,
                   help="weight of the prompt-consistency loss (default 1)")
    g = p.add_argument_group("TCA (test-time, no support set)")
    g.add_argument("--tca-keep-ratio", type=float, default=0.7,
                   help="fraction of patch tokens leaving each condensation block (default 0.7; 1 = none)")
    g.add_argument(
        "--tca-mode",
        choices=["merge", "prune"],
        default="merge",
        help="merge (TCA: coreset-merge ambiguous tokens, fuse the rest) or prune (drop them) (default merge)",
    )
    g.add_argument("--tca-layers", nargs="+", type=int, help="condensation blocks, 0-based (default L/4, L/2, 3L/4)")
    g.add_argument("--tca-reservoir-size", type=int, default=3, help="reservoir entries per class (default 3)")
    g.add_argument(
        "--tca-correction-weight",
        type=float,
        default=3.0,
        help="lambda of the reservoir logits lambda*exp(-beta(1-affinity)); 0 turns correction off (default 3)",
    )
    g.add_argument("--tca-beta", type=float, default=5.0, help="beta of the reservoir logits (default 5)")
    g.add_argument(
        "--tca-no-anchors", action="store_true", help="condense without the reservoir's domain anchor tokens"
    )
    g.add_argument("--tca-batch-size", type=int, default=1, help="test images per step (default 1, as the paper)")
    g = p.add_argument_group("ComCLIP (training-free, no support set)")
    g.add_argument("--comclip-weighting", choices=["softmax", "sum"], default="softmax",
                   help="softmax over the component scores (the paper) or scores over their sum (the released code)")
    g.add_argument("--comclip-size", type=int, default=200, help="relation scenes to score (default 200)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_load_arguments(p)


def summary_rows(results: dict) -> list[list]:
    """(method, shots, test, heldout, delta) rows; zero-shot first."""
    zs = results["zero_shot"]
    rows = [["zero-shot", 0, zs["test"], zs.get("heldout", ""), 0.0]]
    for k, methods in results["shots"].items():
        for method, r in methods.items():
            if method == "clipn" or "test" not in r or r["test"] is None:
                continue
            rows.append([method, int(k), r["test"], r.get("heldout", ""), r["test"] - zs["test"]])
    for method, r in results.get("test_time", {}).items():
        rows.append([f"{method} (test-time, {r['gflops_saved']:.0%} fewer GFLOPs)", 0, r["test"], r.get("heldout", ""),
                     r["test"] - zs["test"]])
    return rows


def _check_shard_set(root: str | None) -> None:
    """``--dataset shards``: a shard directory with the three splits the experiment reads, else one clear line."""
    from ..data.shards import MANIFEST, read_manifest
    from ..errors import ConfigError

    if not root:
        raise ConfigError("--dataset shards reads a shard directory: give it with --data-root DIR (written by "
                          "'clipforge data convert SRC --out DIR --val-fraction 0.25 --test-fraction 0.25')")
    if not (Path(root) / MANIFEST).is_file():
        raise ConfigError(f"{root} is not a shard set (no {MANIFEST}); write one with 'clipforge data convert SRC "
                          f"--out {root} --val-fraction 0.25 --test-fraction 0.25'")
    have = [s for s, info in read_manifest(root)["splits"].items() if info.get("count")]
    missing = [s for s in ("train", "val", "test") if s not in have]
    if missing:
        raise ConfigError(f"{root} has the splits {have} but adapt needs train (support sets), val (selection) and "
                          f"test (accuracy); convert again with --val-fraction and --test-fraction (e.g. 0.25 each)")


def run(args) -> int:
    import dataclasses
    import json

    import torch

    from ..adapt.comclip import ComCLIPConfig
    from ..adapt.coop import CoOpConfig
    from ..adapt.gopro import GOProConfig
    from ..adapt.tca import TCAConfig
    from ..adapt.tip_adapter import TipAdapterFConfig
    from ..adapt.tmm import TMMConfig
    from ..errors import ConfigError
    from ..evaluation.adaptation import METHODS, AdaptConfig, run_adaptation
    from ..interop import load
    from ..train.device import resolve_device
    from .common import dump_json, quiet_logger, table

    device = resolve_device(args.device)  # an absent GPU is named before anything loads
    if args.dataset == "shards":
        _check_shard_set(args.data_root)
    methods = tuple(METHODS) if "all" in args.method else tuple(dict.fromkeys(args.method))
    init = None if args.coop_ctx_init.lower() == "none" else args.coop_ctx_init
    for name in ("tmm_epochs", "gopro_epochs", "coop_epochs"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    shared = CoOpConfig(ctx_init=init, n_ctx=args.coop_n_ctx, lr=args.coop_lr)
    try:
        tmm = TMMConfig(prompt=dataclasses.replace(shared, epochs=args.tmm_epochs))
        gopro = GOProConfig(prompt=dataclasses.replace(shared, epochs=args.gopro_epochs), views=args.gopro_views,
                            view_weight=args.gopro_view_weight, consistency_weight=args.gopro_consistency_weight)
    except ValueError as e:
        raise ConfigError(f"{e} (check the --gopro-* options)") from None
    cfg = AdaptConfig(
        dataset=args.dataset,
        view=args.view,
        methods=methods,
        shots=tuple(args.shots),
        seeds=tuple(args.seeds),
        size=args.size,
        data_seed=args.data_seed,
        data_root=args.data_root,
        cache_dir=args.cache_dir,
        tip_f=TipAdapterFConfig(epochs=args.tip_f_epochs, lr=args.tip_f_lr),
        coop=CoOpConfig(
            ctx_init=init,
            n_ctx=args.coop_n_ctx,
            class_specific=args.coop_class_specific,
            epochs=args.coop_epochs,
            lr=args.coop_lr,
        ),
        tmm=tmm,
        gopro=gopro,
        tca=TCAConfig(
            layers=tuple(args.tca_layers) if args.tca_layers else None,
            keep_ratio=args.tca_keep_ratio,
            mode=args.tca_mode,
            reservoir_size=args.tca_reservoir_size,
            correction_weight=args.tca_correction_weight,
            beta=args.tca_beta,
            anchors=not args.tca_no_anchors,
        ),
        tca_batch_size=args.tca_batch_size,
        comclip=ComCLIPConfig(weighting=args.comclip_weighting),
        comclip_size=args.comclip_size,
    )
    model, tokenizer, _ = load(args.model, **load_options(args))
    model.to(device)
    with quiet_logger("clipforge", args.quiet or args.json), fp32_linears(args.fp32_linear, str(device)):
        results, adapters = run_adaptation(model, tokenizer, cfg)
    results["model"] = str(args.model)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapt.json").write_text(json.dumps(results, indent=2))
        torch.save(adapters, out / "adapters.pt")
    if args.json:
        print(dump_json(results))
        return 0
    print(
        f"{results['dataset']} / {results['view']} ({results['num_classes']} classes, chance {results['chance']:.3f}), "
        f"mean over seeds {list(cfg.seeds)}"
    )
    print(table(summary_rows(results), ["method", "shots", "test top-1", "heldout top-1", "delta test"]))
    if "ood" in results and "mcm" in results["ood"]:
        rows = [["MCM (zero-shot)", "", results["ood"]["mcm"]["auroc"], results["ood"]["mcm"]["fpr95"]]]
        for k, methods_ in results["shots"].items():
            if "clipn" in methods_:
                r = methods_["clipn"]
                rows += [["CLIPN no-prompts ctw", int(k), r["auroc_ctw"], r["fpr95_ctw"]],
                         ["CLIPN no-prompts atd", int(k), r["auroc_atd"], r["fpr95_atd"]]]
        print(table(rows, ["OOD score (in: shapes, out: textures)", "shots", "AUROC", "FPR@95"]))
    com = results.get("compositional", {}).get("comclip")
    if com and "skipped" not in com:
        rows = [[name, com[f"clip_{k}"], com[f"comclip_{k}"], com[f"comclip_detected_{k}"]] for k, name in
                (("relation", "relation flipped"), ("swap", "subject/object swapped"))]
        print(table(rows, [f"ComCLIP ({com['n']} relation scenes): true caption wins vs", "CLIP",
                           "ComCLIP (scene boxes)", "ComCLIP (detected boxes)"]))
    elif com:
        print(f"comclip skipped: {com['skipped']}")
    if args.out:
        print(f"written: {Path(args.out) / 'adapt.json'}, {Path(args.out) / 'adapters.pt'}")
    return 0
