"""``clipforge embed``: images or texts to normalized embeddings in .npy or .parquet."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_load_arguments, load_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run, checkpoint or model directory, or anything clipforge.load reads "
                                 "(Hugging Face/OpenCLIP/OpenAI checkpoints, a uCLIP pivot directory)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--images", nargs="+", help="image files or directories (searched for .png/.jpg/.jpeg/.webp/.bmp/.gif)"
    )
    src.add_argument("--texts", nargs="+", help="texts to embed")
    src.add_argument("--text-file", help="a file with one text per line")
    p.add_argument(
        "--out", required=True, help="output file: .npy (array [N, d]) or .parquet (columns: item, embedding)"
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (a GPU when there is one, else the CPU; default), cpu, cuda, "
                        "cuda:N or mps")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="weights and compute for embedding: fp32 (default) or bf16 (CLIP.to_inference: weights cast "
                        "once, embeddings still written as float32; faster on CPUs with bf16 instructions)")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images (they are listed) instead of stopping"
    )
    add_load_arguments(p)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _expand(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def run(args) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from .. import load
    from ..evaluation import encode_texts
    from ..images import ImageLoadError, load_image
    from ..train.device import resolve_device

    out = Path(args.out)
    if out.suffix not in (".npy", ".parquet"):
        raise ValueError(f"--out must end in .npy or .parquet, got '{out.name}'")
    device = resolve_device(args.device)  # an absent GPU is named before the model loads
    # any format clipforge.load reads, with the model's own tokenizer and preprocessing
    # (CLIP BPE, a Hugging Face text tower's tokenizer, or raw text for a uCLIP pivot model)
    model, tokenizer, transform = load(args.model, **load_options(args))
    model.eval().to(device)
    if args.dtype != "fp32":
        if not hasattr(model, "to_inference"):
            from ..errors import ConfigError

            raise ConfigError(f"--dtype {args.dtype} needs a clipforge CLIP model; '{args.model}' loads as a "
                              f"{type(model).__name__}: leave out --dtype")
        model.to_inference(args.dtype)
    if args.images:
        import torch

        files, keys, chunks, bad = _expand(args.images), [], [], []
        if not files:
            raise FileNotFoundError(f"no images found in {args.images}")
        for i in tqdm(range(0, len(files), args.batch_size), desc="embed images", unit="batch"):
            pixels = []
            for f in files[i : i + args.batch_size]:
                try:
                    pixels.append(transform(load_image(f)))
                    keys.append(str(f))
                except ImageLoadError as e:
                    if not args.skip_bad:
                        raise ValueError(f"{e} (pass --skip-bad to skip unreadable images)") from None
                    bad.append(str(f))
            if pixels:
                with torch.no_grad():
                    chunks.append(model.encode_image(torch.stack(pixels).to(device)).float().cpu())
        emb = torch.cat(chunks).numpy() if chunks else np.zeros((0, model.cfg.embed_dim), np.float32)
        if bad:
            print(f"skipped {len(bad)} unreadable images: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    else:
        keys = args.texts or [l.rstrip("\n") for l in open(args.text_file, encoding="utf-8") if l.strip()]
        emb = encode_texts(model, keys, tokenizer, args.batch_size).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, emb.astype(np.float32))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {"item": keys, "embedding": pa.array(list(emb.astype(np.float32)), type=pa.list_(pa.float32()))}
        )
        pq.write_table(table, out)
    print(f"wrote {emb.shape[0]} embeddings of dimension {emb.shape[1]} to {out}")
    return 0
