"""``clipforge lvlm-train``: train the LLaVA-style LVLM (captioning), then fine-tune it into an embedder
(discriminative fine-tuning, or UniME)."""
from __future__ import annotations

import argparse

from .common import add_overwrite_argument, check_output_dir

EPILOG = """\
stages (clipforge/train/lvlm.py):
  caption         next-token loss over shapes captions with the image tokens prefixed (LLaVA-style)
  discriminative  contrastive + next-token loss through soft prompts and LoRA (Discriminative Fine-tuning of LVLMs)
  unime           textual knowledge distillation from a teacher LM, then hard-negative contrast (UniME)

Embeddings are the LM's last hidden state of "<image> Summarize the above image in one word:" (images) and
"<text> Summarize the above sentence in one word:" (texts). Each stage writes a clipforge model directory:

  clipforge lvlm-train --stage caption --lm LM_DIR --steps 300 --out runs/lvlm
  clipforge lvlm-train --stage discriminative --init-from runs/lvlm --steps 100 --out runs/lvlm-disc
  clipforge lm-finetune LM_DIR --steps 100 --out runs/teacher
  clipforge lvlm-train --stage unime --init-from runs/lvlm --teacher runs/teacher --out runs/lvlm-unime
  clipforge eval runs/lvlm-disc; clipforge embed runs/lvlm-disc --texts "a red circle" --out e.npy
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("--stage", required=True, choices=("caption", "discriminative", "unime"),
                   help="which training stage (below)")
    p.add_argument("--out", required=True, help="output model directory")
    add_overwrite_argument(p)
    p.add_argument("--lm", default="", help="a Hugging Face causal LM directory (a new LVLM)")
    p.add_argument("--gguf", default=None, help="a GGUF file in the LM directory")
    p.add_argument("--layers", type=int, default=None, help="keep the LM's first N decoder layers (default: all)")
    p.add_argument("--model", default="lvlm-tiny", help="architecture of a new LVLM (name or JSON file)")
    p.add_argument("--init-from", default=None, help="a saved LVLM to continue from (a previous stage's --out)")
    p.add_argument("--dataset", default="shapes", help="training data (a dataset name)")
    p.add_argument("--train-size", type=int, default=2000, help="training samples of --dataset")
    p.add_argument("--eval-size", type=int, default=128, help="held-out samples for the caption loss")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (unime: of the contrast, after --kd-steps)")
    p.add_argument("--batch-size", type=int, default=32, help="image-caption pairs per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and new weights")
    p.add_argument("--train-lm", choices=("full", "frozen"), default="full", help="caption stage: train the LM or not")
    p.add_argument("--soft-prompt-tokens", type=int, default=4, help="discriminative: learned prompt tokens")
    p.add_argument("--lora-rank", type=int, default=8, help="discriminative, unime: rank r of the LoRA updates")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale alpha (the update is alpha / r * B A)")
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="names of the LM's linear layers LoRA adapts")
    p.add_argument("--caption-weight", type=float, default=1.0, help="discriminative: weight of the next-token loss")
    p.add_argument("--teacher", default="", help="unime: the teacher causal LM directory (e.g. lm-finetune's --out)")
    p.add_argument("--teacher-gguf", default=None, help="unime: a GGUF file in the teacher's directory")
    p.add_argument("--teacher-layers", type=int, default=None,
                   help="unime: keep the teacher's first N decoder layers (default: all)")
    p.add_argument("--kd-steps", type=int, default=50, help="unime: distillation steps")
    p.add_argument("--kd-temperature", type=float, default=0.05, help="unime: temperature of the textual distillation")
    p.add_argument("--temperature", type=float, default=0.05, help="unime: the hard-negative contrast's tau")
    p.add_argument("--hard-negatives", type=int, default=8, help="unime: k hardest negatives per query")
    p.add_argument("--fn-beta", type=float, default=0.1, help="unime: false-negative margin beta")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args) -> int:
    from ..train.lvlm import LVLMTrainConfig, train_lvlm
    from .common import quiet_logger

    check_output_dir(args.out, args.overwrite)  # before anything loads or trains
    cfg = LVLMTrainConfig(
        stage=args.stage, lm=args.lm, gguf_file=args.gguf, layers=args.layers, model=args.model,
        init_from=args.init_from, dataset=args.dataset, train_size=args.train_size, eval_size=args.eval_size,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, train_lm=args.train_lm,
        soft_prompt_tokens=args.soft_prompt_tokens, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",")), caption_weight=args.caption_weight,
        teacher=args.teacher, teacher_gguf_file=args.teacher_gguf, teacher_layers=args.teacher_layers,
        kd_steps=args.kd_steps, kd_temperature=args.kd_temperature, temperature=args.temperature,
        hard_negatives=args.hard_negatives, fn_beta=args.fn_beta)
    with quiet_logger("clipforge", args.quiet):  # progress lines through clipforge's console handler (main.py)
        report = train_lvlm(cfg, args.out)
    if args.quiet:  # otherwise the training's own last progress line said this already
        print(f"lvlm {cfg.stage}, {cfg.steps} steps: held-out caption loss {report['val_caption_loss_before']:.3f} "
              f"-> {report['val_caption_loss_after']:.3f}; saved to {args.out}")
    return 0
