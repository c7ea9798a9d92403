"""``clipforge data``: build corpora into webdataset shards and describe built shard directories.

    clipforge data build openclipart --out DIR [--image-size 128] [--limit N] [--workers 2]
    clipforge data build emoji --out DIR
    clipforge data info DIR
    clipforge data convert SRC --out DIR [--shard-size-mb 64] [--image-size N] [--val-fraction F]
    clipforge data export-wds SRC --out DIR     # CLIP_benchmark's webdataset layout (clipforge eval, clip_benchmark)
    clipforge data curate SRC --entries FILE|builtin --t N --out DIR   # MetaCLIP curation, train split
    clipforge data cluster RUN --k N [--dataset NAME --size N --seed S --root DIR] [--out FILE]   # MLCD

``--out`` defaults to ``$CLIPFORGE_DATA/NAME`` (``~/.cache/clipforge/data/NAME``), where
``build_dataset(NAME, ...)`` looks for it. An interrupted build resumes when run again.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..data.corpora import BUILDERS

    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    action = functools.partial(sub.add_parser, formatter_class=p.formatter_class)  # defaults shown as in `data`
    b = action("build", help="render a corpus from installed packages into shards",
                       description="render a corpus from installed packages into train/val/test webdataset shards")
    b.add_argument("name", choices=sorted(BUILDERS), help="the corpus")
    b.add_argument("--out", help="shard directory (default: $CLIPFORGE_DATA/NAME or ~/.cache/clipforge/data/NAME)")
    b.add_argument("--image-size", type=int, default=128, help="side of the square images in pixels (default 128)")
    b.add_argument("--limit", type=int, help="use at most N source items, spread over the corpus (for quick builds)")
    b.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    b.add_argument("--shard-size-mb", type=float, default=16, help="target size of one shard in MB (default 16)")
    b.add_argument("--dedup-distance", type=int, default=8,
                   help="near duplicates: 128-bit dHash Hamming distance at most this (default 8); "
                        "groups of them touching train go to train")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    c = action("convert", help="convert a manifest, image folder or shards into a shard directory",
                       description="convert anything the format readers read (CSV/TSV/JSONL/Parquet manifest, "
                                   "image folder with .txt captions, webdataset .tar or folder of them) into "
                                   "webdataset shards with manifest.json and stats.json; rerun to resume")
    c.add_argument("src", help="a manifest file, an image folder, a .tar shard or a folder of shards")
    c.add_argument("--out", required=True, help="the shard directory to write")
    c.add_argument("--shard-size-mb", type=float, default=64, help="target size of one shard in MB (default 64)")
    c.add_argument("--image-size", type=int, help="resize (shortest side) and center crop to N x N (default: keep)")
    c.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of samples for val, by a hash of their source key (default 0; a split the source "
                        "states is kept)")
    c.add_argument("--test-fraction", type=float, default=0.0, help="fraction of samples for test (default 0)")
    c.add_argument("--label-from-folder", action="store_true",
                   help="image folders: label view 'folder' = the first-level folder")
    c.add_argument("--name", help="dataset name in the manifest (default: the source's name)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    e = action("export-wds", help="write an image folder, manifest or shard directory in CLIP_benchmark's "
                                          "webdataset layout",
                       description="write SRC as DIR/<split>/{0..N-1}.tar + nshards.txt, classnames.txt, "
                                   "zeroshot_classification_templates.txt (classification) or dataset_type.txt "
                                   "(retrieval), the layout clip_benchmark and `clipforge eval --dataset wds:DIR` read")
    e.add_argument("src", help="imagefolder:DIR, csv:FILE, jsonl:FILE, parquet:FILE, shards:DIR, or a plain path "
                               "(folder with manifest.json = shards, other folder = image folder, manifest file)")
    e.add_argument("--out", required=True, help="the directory to write")
    e.add_argument("--split", default="test", help="name of the exported split (shard directories: the split to "
                                                   "export; a train split is exported too). Default test")
    e.add_argument("--label-column", help="manifests: the class column; shard directories: the label view")
    e.add_argument("--classnames", help="file of class names, one per line (overrides the source's)")
    e.add_argument("--templates", default="openai_imagenet",
                   help="templates written where the source has none: openai_imagenet, openai_short, simple or a file")
    e.add_argument("--max-count", type=int, default=10_000, help="samples per tar shard (default 10000)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    u = action("curate", help="MetaCLIP curation: a balanced subset of a shard set's train split",
                       description="MetaCLIP curation (Xu et al., 'Demystifying CLIP Data', 2023) of SRC's train "
                                   "split: keep the samples whose captions contain a metadata entry (substring match), "
                                   "then balance: a sample matching entry e is kept with probability t/count(e) "
                                   "(entries seen at most t times keep every sample). Writes a new shard set "
                                   "with the kept train samples and SRC's val and test splits unchanged.")
    u.add_argument("src", help="a shard directory (clipforge data build|convert), or the name of a corpus in the "
                               "data home")
    u.add_argument("--entries", required=True,
                   help="metadata: a text file with one entry per line, or 'builtin' (common nouns, the shapes "
                        "vocabulary and emoji names)")
    u.add_argument("--t", type=float, required=True,
                   help="balancing threshold: about this many samples at most per entry (MetaCLIP: 20000 for 400M)")
    u.add_argument("--out", required=True, help="the shard directory to write")
    u.add_argument("--seed", type=int, default=0, help="seed of the balancing draws (default 0)")
    u.add_argument("--case-sensitive", action="store_true",
                   help="match case-sensitively, as MetaCLIP does (default: lowercase captions and entries)")
    u.add_argument("--word-boundary", action="store_true",
                   help="match whole words only (default: substrings, as MetaCLIP: 'cat' matches 'category')")
    u.add_argument("--shard-size-mb", type=float, default=64, help="target size of one shard in MB (default 64)")
    k = action("cluster", help="MLCD's offline step: k-means centers of a trained model's image features",
                       description="embed the training images with a trained model (once, offline), cluster the "
                                   "features into K centers and store centers and features with the model's and the "
                                   "data's identity; train with loss='{clip: 1, mlcd: {clusters: FILE}}'")
    k.add_argument("run", help="a run directory or checkpoint (anything clipforge.load reads)")
    k.add_argument("--k", type=int, required=True, help="number of cluster centers")
    k.add_argument("--dataset", help="training dataset (default: the run's data.dataset, else shapes)")
    k.add_argument("--size", type=int, help="training samples (default: the run's data.train_size, else 20000)")
    k.add_argument("--seed", type=int, help="data seed (default: the run's data.seed, else 0)")
    k.add_argument("--root", help="shard directory of the dataset (default: the run's data.root)")
    k.add_argument("--iters", type=int, default=20, help="k-means iterations (default 20)")
    k.add_argument("--cluster-seed", type=int, default=0, help="seed of the k-means start (default 0)")
    k.add_argument("--out", help="the cluster file (default: next to the data for shard datasets)")
    i = action(
        "info", help="summarize a built shard directory", description="summarize a built shard directory"
    )
    i.add_argument("dir", help="a shard directory, or the name of a corpus in the data home")
    i.add_argument("--json", action="store_true", help="print manifest and stats as one JSON object")
    r = action("reinforce", help="write MobileCLIP's reinforced dataset: K stored augmentations, synthetic "
                                         "captions and teacher embeddings per augmentation and caption",
                       description="write MobileCLIP's reinforced dataset (train with data.reinforced=DIR and a "
                                   "distillation term, e.g. loss={clip: 1.0, distill_kl: 1.0})")
    r.add_argument("src", help="the training dataset's name (shapes, shapes_long, a built corpus, a+b)")
    r.add_argument("--teachers", required=True, help="teacher models, comma-separated (run or model directories)")
    r.add_argument("--augmentations", type=int, default=4, help="K stored augmentations per image (default 4)")
    r.add_argument("--synthetic", type=int, default=2, help="synthetic captions per image (rule rewrites; default 2)")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--size", type=int, default=1024, help="training samples (data.train_size of the runs)")
    r.add_argument("--seed", type=int, default=0, help="data seed (data.seed of the runs)")
    r.add_argument("--image-size", type=int, default=64, help="the student's (and teachers') image size")
    r.add_argument("--scale", type=float, nargs=2, default=[0.5, 1.0], help="random resized crop area fraction")
    r.add_argument("--hflip", action="store_true", help="random horizontal flips (off: captions state left/right)")
    r.add_argument("--jitter", type=float, default=0.2, help="color jitter strength (0: none)")
    p.set_defaults(_data_parser=p)


def _summary(root: Path) -> str:
    from ..data.shards import STATS, read_manifest
    from .common import table

    manifest = read_manifest(root)
    stats = json.loads((root / STATS).read_text()) if (root / STATS).exists() else {}
    rows = [[s, info["count"], len(info["shards"]), f"{sum(x['bytes'] for x in info['shards']) / 1e6:.1f} MB"]
            for s, info in manifest["splits"].items()]
    lines = [f"{manifest['name']} at {root}: {manifest['total']} samples, image size {manifest.get('image_size')}",
             table(rows, ["split", "samples", "shards", "size"])]
    views = ", ".join(f"{v} ({len(spec['classes'])} classes)" for v, spec in manifest["label_views"].items())
    lines.append(f"label views: {views}")
    if stats:
        c = stats.get("captions") or {}
        if c.get("per_image", {}).get("n"):  # a shard set with no sample has no means to show
            lines.append(f"captions per image: mean {c['per_image']['mean']}, max {c['per_image']['max']}; "
                         f"caption length: mean {c['characters']['mean']} characters, {c['words']['mean']} words")
        lines.append(f"skipped: {stats.get('skipped') or 'none'}")
        if "leakage" in stats:
            lk = stats["leakage"]
            lines.append(f"leakage control (dHash distance <= {lk['max_distance']}): {lk['near_duplicate_groups']} "
                         f"near-duplicate groups, moved {lk['moved'] or 'none'}")
        if "build" in stats:
            lines.append(f"build time: {stats['build']['total_seconds']} s")
    return "\n".join(lines)


def run(args) -> int:
    from ..data.corpora import get_builder
    from ..data.shards import corpus_root

    if args.data_command == "build":
        out = corpus_root(args.name, args.out)
        t0 = time.perf_counter()
        get_builder(args.name)(out, image_size=args.image_size, limit=args.limit, workers=args.workers,
                               shard_bytes=int(args.shard_size_mb * 1e6), progress=not args.quiet,
                               leakage_distance=args.dedup_distance)
        print(_summary(out))
        print(f"done in {time.perf_counter() - t0:.1f} s; use it with build_dataset('{args.name}', root='{out}') "
              f"or data.dataset={args.name} (with CLIPFORGE_DATA={out.parent})")
        return 0
    if args.data_command == "reinforce":
        from ..train.reinforce import reinforce

        t0 = time.perf_counter()
        store = reinforce(args.src, [t.strip() for t in args.teachers.split(",") if t.strip()], args.out,
                          augmentations=args.augmentations, synthetic=args.synthetic, size=args.size, seed=args.seed,
                          image_size=args.image_size, scale=tuple(args.scale), hflip=args.hflip, jitter=args.jitter)
        n_caps = sum(len(c) for c in store.captions)
        print(f"reinforced {store.meta['size']} samples of {args.src}: {store.k} augmentations each, {n_caps} "
              f"captions, {len(store.image)} teacher(s); {time.perf_counter() - t0:.1f} s; train with "
              f"data.reinforced={args.out} data.dataset={args.src} data.train_size={store.meta['size']} "
              f"data.seed={args.seed}")
        return 0
    if args.data_command == "convert":
        from ..data.convert import convert

        t0 = time.perf_counter()
        out = Path(args.out)
        convert(args.src, out, shard_bytes=int(args.shard_size_mb * 1e6), image_size=args.image_size,
                val_fraction=args.val_fraction, test_fraction=args.test_fraction, name=args.name,
                label_from_folder=args.label_from_folder, progress=not args.quiet)
        print(_summary(out))
        stats = json.loads((out / "stats.json").read_text())
        read = stats.get("source_read", {})
        skipped = stats.get("skipped") or {}
        from .common import table

        rows = [[reason, n, "; ".join(read.get("examples", {}).get(reason, [])[:2])] for reason, n in skipped.items()]
        if rows:
            print(table(rows, ["skipped", "records", "examples"]))
        print(f"done in {time.perf_counter() - t0:.1f} s; train on it with data.dataset=shards data.root={out} "
              "(data.streaming=true to stream it)")
        return 0
    if args.data_command == "export-wds":
        from ..evaluation.export_wds import export_wds
        from .common import table

        t0 = time.perf_counter()
        rep = export_wds(args.src, args.out, split=args.split, label_column=args.label_column,
                         classnames=args.classnames, templates=args.templates, max_count=args.max_count,
                         progress=not args.quiet)
        rows = [[name, s["samples"], s["shards"], ", ".join(f"{k}: {v}" for k, v in s["skipped"].items()) or "none"]
                for name, s in rep["splits"].items()]
        print(f"{rep['source']} -> {args.out} ({rep['type']})")
        print(table(rows, ["split", "samples", "shards", "skipped"]))
        print(
            f"done in {time.perf_counter() - t0:.1f} s; evaluate it with clipforge eval MODEL --dataset wds:{args.out}"
        )
        return 0
    if args.data_command == "curate":
        from ..data.curation import curate_shards, read_entries

        if args.t <= 0:
            raise ValueError(f"--t must be positive (about how many samples to keep per entry), got {args.t}")
        src = Path(args.src)
        if not src.exists():
            src = corpus_root(args.src)
        t0 = time.perf_counter()
        manifest = curate_shards(src, args.out, read_entries(args.entries), t=args.t, seed=args.seed,
                                 shard_bytes=int(args.shard_size_mb * 1e6), lowercase=not args.case_sensitive,
                                 word_boundary=args.word_boundary)
        c = manifest["curation"]
        print(_summary(Path(args.out)))
        print(f"curation: {c['pool']} train samples, {c['matched']} matched an entry, "
              f"{c['kept']} kept at t={c['t']:g}; "
              f"head entries (> t): {c['head_entries']}, their share of matches {c['head_share_before']:.3f} -> "
              f"{c['head_share_after']:.3f}")
        print(f"done in {time.perf_counter() - t0:.1f} s; train on it with data.dataset=shards data.root={args.out}")
        return 0
    if args.data_command == "info":
        root = Path(args.dir)
        if not root.exists():
            root = corpus_root(args.dir)
        if args.json:
            from ..data.shards import STATS, read_manifest

            stats = json.loads((root / STATS).read_text()) if (root / STATS).exists() else {}
            print(json.dumps({"manifest": read_manifest(root), "stats": stats}, ensure_ascii=False))
        else:
            print(_summary(root))
        return 0
    if args.data_command == "cluster":
        return _cluster(args)
    args._data_parser.print_help()
    return 0


def _cluster(args) -> int:
    from ..data import build_dataset
    from ..errors import ConfigError
    from ..interop import load
    from ..train.clusters import compute_clusters, data_identity, save_clusters, weights_fingerprint
    from ..train.config import DataConfig

    run = Path(args.run)
    saved = {}
    if (run / "config.yaml").is_file():  # a run directory or checkpoint: its training data by default
        from omegaconf import OmegaConf

        saved = (OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True) or {}).get("data") or {}
    data = DataConfig(dataset=args.dataset or saved.get("dataset", "shapes"),
                      train_size=args.size if args.size is not None else saved.get("train_size", 20_000),
                      seed=args.seed if args.seed is not None else saved.get("seed", 0),
                      root=args.root or saved.get("root"))
    model, _, _ = load(args.run)
    dataset = build_dataset(data.dataset, split="train", size=data.train_size, seed=data.seed,
                            image_size=model.image_size, **({"root": data.root} if data.root else {}))
    fingerprint = weights_fingerprint(model)
    if args.out:
        out = Path(args.out)
    elif hasattr(dataset, "root"):  # next to the data
        out = Path(dataset.root) / f"train.clusters.k{args.k}.n{len(dataset)}.seed{data.seed}.{fingerprint[:12]}.pt"
    else:
        raise ConfigError(f"data.dataset={data.dataset} has no directory to store the clusters next to; "
                          "name the file with --out FILE")
    t0 = time.perf_counter()
    clusters = compute_clusters(model, dataset, args.k, iters=args.iters, seed=args.cluster_seed)
    path = save_clusters(out, clusters, {"source": str(run), "sha256": fingerprint}, data_identity(data, dataset),
                         args.k, args.iters, args.cluster_seed)
    import torch

    from ..losses.kmeans import nearest

    sizes = torch.bincount(nearest(clusters["features"], clusters["centers"]), minlength=args.k).tolist()
    print(f"{args.k} centers of {len(dataset)} {data.dataset} training images (model {run}, sha256 "
          f"{fingerprint[:12]}), cluster sizes {min(sizes)}..{max(sizes)}, "
          f"in {time.perf_counter() - t0:.1f} s -> {path}")
    same = f"data.dataset={data.dataset} data.train_size={data.train_size} data.seed={data.seed}" + (
        f" data.root={data.root}" if data.root else "")
    print(f"train with loss='{{clip: 1.0, mlcd: {{weight: 1.0, clusters: {path}}}}}' and the data it was computed "
          f"on: {same}")
    return 0
