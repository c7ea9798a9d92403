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
        "--images", nargs="+",
        help="image files or directories (searched recursively for .png/.jpg/.jpeg/.webp/.bmp/.gif/.tif/.tiff)"
    )
    src.add_argument("--dataset", metavar="SPEC",
                     help="the images of a dataset spec as clipforge eval reads it: imagefolder:DIR, wds:DIR, "
                          "csv:FILE, tsv:FILE, jsonl:FILE, parquet:FILE or shards:DIR (items keyed by the "
                          "dataset's keys)")
    src.add_argument("--texts", nargs="+", help="texts to embed")
    src.add_argument("--text-file", help="a file with one text per line")
    p.add_argument(
        "--out", required=True, help="output file: .npy (array [N, d]) or .parquet (columns: item, embedding)"
    )
    p.add_argument("--batch-size", type=int, default=128, help="images or texts per forward pass")
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (a GPU when there is one, else the CPU; default), cpu, cuda, "
                        "cuda:N or mps")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="weights and compute for embedding: fp32 (default) or bf16 (CLIP.to_inference: weights cast "
                        "once, embeddings still written as float32; faster on CPUs with bf16 instructions)")
    p.add_argument("--compile", action="store_true",
                   help="images: run the image tower through torch.compile with frozen weights, compiled once for "
                        "--batch-size (the last batch is padded). The first batch pays the compilation (10-45 s for "
                        "ViT-B-32 on 2 cores); after that ViT-B-32 images ran 1.03-1.17x the (fused) eager speed on a "
                        "CPU with AMX, but 1.01-1.06x in bf16 and 0.74-0.85x in fp32 on an AVX-512 CPU without AMX "
                        "(docs/performance.md, \"Fused inference layers\"): measure on your machine. Falls back to "
                        "eager, with a warning, where compilation fails")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images (they are listed) instead of stopping"
    )
    p.add_argument("--split", default="test",
                   help="the split of a --dataset wds:DIR or shards:DIR to embed (default test)")
    p.add_argument("--image-column", default="image",
                   help="--dataset manifests: the column holding the image path (default image)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    r = p.add_argument_group("engine (images only)")
    r.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: batch inference with Ray Data, an actor pool each "
                        "holding the model once, resumable block by block (needs `pip install clipforge[ray]`)")
    r.add_argument("--ray-address", metavar="HOST:PORT",
                   help="an existing Ray cluster: HOST:PORT of its head, ray://HOST:PORT (Ray Client), or auto "
                        "(the one `ray start` made here); default: a new local Ray instance for this command")
    r.add_argument("--ray-actors", type=int, default=2, help="actors, each holding one copy of the model (default 2)")
    r.add_argument("--ray-cpus-per-actor", type=int, default=1,
                   help="CPUs (and torch threads) per actor (default 1)")
    r.add_argument("--ray-connect-timeout", type=float, default=5.0,
                   help="seconds to wait for --ray-address to answer (default 5)")
    r.add_argument("--block-size", type=int, default=1024,
                   help="images per output block, the unit of resuming (default 1024)")
    r.add_argument("--work-dir", help="where the finished blocks are kept until the output is written "
                                      "(default: OUT.blocks beside --out); a rerun skips the finished blocks")
    r.add_argument("--keep-blocks", action="store_true",
                   help="keep the work directory after the output is written (default: delete it)")
    add_load_arguments(p)


def run(args) -> int:
    from ..errors import ConfigError
    from ..serve.embed import collect_dataset, collect_images, output_path

    out = output_path(args.out)
    if args.engine == "ray":
        if not (args.images or args.dataset):
            raise ConfigError("--engine ray embeds images (--images or --dataset); texts embed in this process: "
                              "leave out --engine ray")
        if args.device not in ("auto", "cpu"):
            raise ConfigError(f"--engine ray runs its actors on CPUs; leave out --device {args.device} "
                              "(or embed on that device in this process without --engine ray)")
        from ..serve.ray_embed import import_ray

        import_ray()  # a missing extra is named before anything is listed or loaded
    if args.compile and not (args.images or args.dataset):
        raise ConfigError("--compile compiles the image tower; texts run eagerly (their batches change length): "
                          "leave out --compile")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.compile and args.engine == "ray":
        raise ConfigError("--compile runs in this process only; leave out --engine ray, or --compile")
    collection = None
    if args.images or args.dataset:
        collection = collect_images(args.images) if args.images else collect_dataset(args.dataset, args.split,
                                                                                      args.image_column)
    if args.engine == "ray":
        return _run_ray(args, collection, out)
    return _run_local(args, collection, out)


def _report_bad(bad: list[str]) -> None:
    if bad:
        print(f"skipped {len(bad)} unreadable images: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


def _run_ray(args, collection, out: Path) -> int:
    import shutil

    from ..serve.embed import write_embeddings
    from ..serve.ray_embed import ModelLoader, embed_ray

    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".blocks")
    loader = ModelLoader(args.model, load_options(args), args.dtype)
    res = embed_ray(loader, collection, work, source=args.model, block_size=args.block_size,
                    batch_size=args.batch_size, actors=args.ray_actors, cpus_per_actor=args.ray_cpus_per_actor,
                    skip_bad=args.skip_bad, address=args.ray_address, connect_timeout=args.ray_connect_timeout,
                    progress=not args.quiet)
    _report_bad(res.bad)
    write_embeddings(out, res.keys, res.embeddings)
    if not args.keep_blocks:
        shutil.rmtree(work)
    print(f"wrote {res.embeddings.shape[0]} embeddings of dimension {res.embeddings.shape[1]} to {out} "
          f"(ray: {res.blocks_computed} blocks embedded, {res.blocks_reused} reused from {work})")
    return 0


def _run_local(args, collection, out: Path) -> int:
    from .. import load
    from ..evaluation import encode_texts
    from ..serve.embed import embed_local, prepare_model, write_embeddings
    from ..train.device import resolve_device

    device = resolve_device(args.device)  # an absent GPU is named before the model loads
    # any format clipforge.load reads, with the model's own tokenizer and preprocessing
    # (CLIP BPE, a Hugging Face text tower's tokenizer, or raw text for a uCLIP pivot model)
    model, tokenizer, transform = load(args.model, **load_options(args))
    model = prepare_model(model.eval().to(device), args.dtype, args.model, frozen=args.compile)
    if collection is not None:
        encoder = model
        if args.compile:
            from ..models.compiled_encoder import CompiledImageEncoder

            encoder = CompiledImageEncoder(model, max(1, min(args.batch_size, len(collection))))
        res = embed_local(encoder, transform, collection, args.batch_size, device, args.skip_bad, not args.quiet)
        keys, emb = res.keys, res.embeddings
        _report_bad(res.bad)
    else:
        keys = args.texts or [l.rstrip("\n") for l in open(args.text_file, encoding="utf-8") if l.strip()]
        emb = encode_texts(model, keys, tokenizer, args.batch_size).numpy()
    write_embeddings(out, keys, emb)
    print(f"wrote {emb.shape[0]} embeddings of dimension {emb.shape[1]} to {out}")
    return 0
