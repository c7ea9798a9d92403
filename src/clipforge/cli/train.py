"""``clipforge train``: train a model from a YAML config plus key=value overrides."""
from __future__ import annotations

import argparse
import functools

HELP = """\
Every field of the training config can be set in a YAML file (--config) and/or as
key=value overrides; overrides win. Common ones:
  model=tiny                 architecture (tiny, coca-tiny, ViT-B-32, ViT-B-16, ViT-L-14)
  steps=2000 batch_size=128  optimizer steps and global batch size
  lr=1e-3 warmup_steps=100   peak learning rate and linear warmup (then cosine)
  accum_steps=2              split each batch into micro-batches (exact full-batch loss)
  precision=bf16             bf16 autocast (fast on CPU) or fp32
  loss={clip:1.0}            loss terms and weights (>= 0), with or without a space after
                             the colon: 'loss={clip: 1, siglip: 0.5}'; loss={siglip:1.0}
                             needs model_overrides.init_logit_bias=-10
  out_dir=runs/exp1          where metrics.jsonl, config.yaml and checkpoints go; one run
                             at a time (a second one into it stops, naming the first)
  resume=latest              continue exactly where the run in out_dir stopped (its newest
                             complete checkpoint); changed lr, warmup_steps, steps,
                             weight_decay, ... apply from there on (logged), a changed
                             model architecture is refused
  max_seconds=300            stop (and checkpoint) after this much training time
  data.train_size=20000      number of training samples
  distributed.nproc=2        data-parallel over 2 local processes (gloo); batch_size stays
                             the global batch. Or: torchrun --nproc_per_node 2 -m
                             clipforge.cli.main train ... (docs/performance.md)
  data.dataset=shards data.root=DIR data.streaming=true
                             stream a shard directory (clipforge data build/convert)
  data.dataset=openclipart+emoji
                             built corpora (clipforge data build NAME), '+' mixes them
  data.caption_sources=original=1,rewrites=1 data.rewrites=rule
                             LaCLIP-style rewrites, computed once and stored with the data
  loss={clip:1.0,multi_positive:0.5} data.positive_source=subcaptions
                             several positives per image (DreamLIP sub-captions)
  model=coca-tiny loss={clip:1.0,caption:2.0}
                             CoCa: contrastive + captioning decoder (docs/models.md)
  init_from=RUN long_context_factor=4 loss={long_clip:1.0} data.dataset=shapes_long
  data.caption_policy=longest data.positive_source=first_sentence data.positives=1
                             Long-CLIP: stretch 77 -> 248 text positions, long + short captions
  init_from=PATH             start from any checkpoint clipforge.load reads (HF, OpenCLIP, OpenAI)
  init_model_name=ViT-B-32 init_trust_pickle=true init_allow_nonfinite=true
                             clipforge.load's model_name (init_vision_model_name for init_vision_from),
                             trust_pickle (pickles, TorchScript: they run code) and allow_nonfinite
  freeze=[text.*]            LiT; trainable=[visual.proj,text.proj,logit_scale]: projections only
  model_overrides.hf_text.path=DIR
                             a pretrained Hugging Face text tower (e.g. all-MiniLM-L6-v2)
Print the full config with --print-config.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .train_data import OWN_DATA_HELP

    p.epilog = HELP + OWN_DATA_HELP
    p.add_argument("--config", help="YAML file with training config fields")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation (at eval_every and at the end)")
    p.add_argument("--fp32-linear", choices=("auto", "onednn", "torch"), default="auto",
                   help="fp32 training on the CPU: 'onednn' runs the linear layers and their gradients as oneDNN "
                        "kernels (same fp32 arithmetic; 1.4x the throughput of torch's own GEMMs on a Zen 5 EPYC, "
                        "docs/performance.md), 'torch' keeps torch's, 'auto' (default) times both once and takes "
                        "oneDNN where it is at least 1.3x faster on this CPU (in every process distributed.nproc "
                        "starts too). Not applied to bf16 runs or model_overrides.compile=true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=500 lr=5e-4")


def evaluate_corpora(model, tokenizer, dataset: str, size: int) -> dict:
    """Zero-shot (every label view, ``test`` split) and retrieval on each part of ``a+b``."""
    from ..evaluation.suite import run_suite

    merged: dict = {"zero_shot": {}, "retrieval": {}}
    for part in dataset.split("+"):
        res = run_suite(model, tokenizer, tasks=["zero_shot", "retrieval"], dataset=part, size=size, cache_dir=None,
                        progress=False).results
        for task in ("zero_shot", "retrieval"):
            merged[task].update({f"{part} {k}": v for k, v in res[task].items()})
    return merged


def run(args) -> int:
    from ..errors import ConfigError
    from ..evaluation import evaluate_shapes
    from ..models.onednn_linear import onednn_fp32_linears
    from ..train import load_config, train
    from ..train.checkpoint import list_checkpoints
    from ..train.config import to_yaml
    from ..train.distributed import is_main_process
    from .common import eval_rows, table
    from .train_data import convert_own_data, evaluate_shard_set, fit_train_size
    from .train_fp32_linear import use_onednn_linears
    from .train_overrides import check_config_file_given, check_split_values, rejoin_brace_expansion

    overrides = rejoin_brace_expansion(args.overrides)  # loss={clip:1.0,siglip:0.5} as bash hands it over
    check_split_values(overrides)  # loss={clip: 1.0} unquoted
    check_config_file_given(overrides)  # clipforge train configs/x.yaml
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    earlier = [] if cfg.resume else list_checkpoints(cfg.out_dir)
    if earlier:  # a fresh run would replace its metrics and mix its checkpoints in (resume=latest takes the newest)
        raise ConfigError(f"out_dir {cfg.out_dir} holds an earlier run ({len(earlier)} checkpoint(s), the last "
                          f"{earlier[-1].name}): continue it with resume=latest, start this run in another out_dir, "
                          "or delete that directory to replace the run")
    cfg = convert_own_data(cfg, progress=cfg.progress)  # data.dataset=csv:FILE and the like: shards converted once
    cfg = fit_train_size(cfg)  # a shard set trains on all of its train split unless data.train_size says otherwise
    # functools.partial, not lambdas: with distributed.nproc > 1 they travel to the started processes by pickling
    evaluate = None
    if not args.no_eval and cfg.data.dataset == "shapes":
        evaluate = functools.partial(evaluate_shapes, size=cfg.data.eval_size)
    elif not args.no_eval and cfg.data.dataset == "shards":
        evaluate = functools.partial(evaluate_shard_set, root=cfg.data.root, size=cfg.data.eval_size)
    elif not args.no_eval:
        evaluate = functools.partial(evaluate_corpora, dataset=cfg.data.dataset, size=cfg.data.eval_size)
    with onednn_fp32_linears(use_onednn_linears(cfg, args.fp32_linear)):
        result = train(cfg, evaluate=evaluate)
    if not is_main_process():  # under torchrun: rank 0 reports
        return 0
    print(
        f"trained {result.step} steps, {result.samples_per_second:.0f} samples/s, checkpoints in "
        f"{cfg.out_dir}/checkpoints"
    )
    if result.eval:
        print(table(eval_rows(result.eval), ["task", "metric", "value", "chance"]))
    return 0
