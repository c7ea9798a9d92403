"""``clipforge serve``: a search page and JSON API over an index built by ``clipforge index``."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys

from .common import add_load_arguments, load_options

EPILOG = """\
examples:
  clipforge serve indexes/emoji-test                  # http://127.0.0.1:8000
  clipforge serve indexes/pictures --model runs/a/checkpoints/step_3000 --port 8080
  clipforge serve indexes/pictures --workers 2        # two server processes share the port

endpoints:
  GET  /                        the search page: text box, image upload / drag-and-drop / paste, result grid
  GET  /search?q=TEXT&k=10      text -> image, JSON {"results": [{"id", "score", "key", "caption", "url", ...}]}
  POST /search/image?k=10       image -> image (multipart form, field "file")
  GET  /search/similar/ID?k=10  images like an indexed one
  POST /classify                zero-shot labels (multipart "file", "labels"="cat, dog, car")
  GET  /image/ID[?size=256]     the image (or a thumbnail)
  GET  /health                  count, dimension, model, backend, the answering process
  GET  /docs                    the API's interactive OpenAPI page

limits (one request cannot exhaust the server; see docs/serving.md):
  request bodies over --max-upload-mb (+1 MiB of form) get 413 as soon as the bytes pass it;
  images declaring over --max-image-pixels get 413 before they are decoded; at most
  --max-uploads uploads are in flight (more get 503 with Retry-After) and --decode-workers
  decode at a time; /classify takes at most --max-labels labels of --max-label-chars characters
  and a template with exactly one {} or {c}. /image/ID serves a file only while it is the one
  indexed (real path inside the indexed folders, same size and modification time), else 404.

--workers N runs N server processes on the one port (the kernel hands each new connection to one of them).
Each holds its own model and search index, so memory grows with N; batching happens within a process.
A worker that dies is restarted. Request handling is mostly Python holding the GIL, so one process uses
about one core however many it has (docs/performance.md measures it).

The model defaults to the one recorded in the index; a --model whose weights differ from the
index's (SHA-256 in manifest.json) is refused with both named. The server binds 127.0.0.1:
reachable from this machine only. It has no authentication, so --host 0.0.0.0 exposes the
index (and the images it points to) to the whole network. Needs the serve extra:
pip install 'clipforge[serve]' (fastapi, uvicorn, python-multipart; faiss-cpu for faster search).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("index", metavar="INDEX_DIR", help="an index directory written by clipforge index")
    p.add_argument("--model", help="the model that encodes queries (default: the one the index was built with); "
                                   "its weights must match the index's")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--backend", default="auto", choices=["auto", "faiss", "numpy"],
                   help="auto: the index's ANN index (ivf/ivfpq/hnsw) with faiss if it has one, else exact search with "
                        "faiss if installed, else numpy; numpy: always exact (same ranking as faiss flat)")
    p.add_argument("--nprobe", type=int, default=None, metavar="N",
                   help="ivf/ivfpq indexes: inverted lists probed per query (default: the value tuned at index time; "
                        "higher = better recall, slower)")
    p.add_argument("--ef-search", type=int, default=None, metavar="N",
                   help="hnsw indexes: candidate list size per query (default: the value tuned at index time)")
    from ..images import DEFAULT_MAX_IMAGE_PIXELS
    from ..serve.app import (
        DECODE_WORKERS,
        MAX_LABEL_CHARS,
        MAX_LABELS,
        MAX_UPLOAD_BYTES,
        MAX_UPLOADS,
        TEXT_BATCH,
        TEXT_BATCH_WAIT_MS,
    )
    from ..serve.search_batching import SEARCH_BATCH

    p.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / (1 << 20), metavar="MB",
                   help=f"largest image upload in MiB (default {MAX_UPLOAD_BYTES >> 20})")
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help=f"largest image (width x height) decoded, uploads and thumbnails (default "
                        f"$CLIPFORGE_MAX_IMAGE_PIXELS or {DEFAULT_MAX_IMAGE_PIXELS:,})")
    p.add_argument("--decode-workers", type=int, default=DECODE_WORKERS, metavar="N",
                   help=f"images decoded and embedded at a time (default {DECODE_WORKERS})")
    p.add_argument("--max-uploads", type=int, default=MAX_UPLOADS, metavar="N",
                   help=f"uploads in flight (decoding or waiting); more get 503 (default {MAX_UPLOADS})")
    p.add_argument("--max-labels", type=int, default=MAX_LABELS, metavar="N",
                   help=f"labels per /classify request (default {MAX_LABELS})")
    p.add_argument("--max-label-chars", type=int, default=MAX_LABEL_CHARS, metavar="N",
                   help=f"characters per label (default {MAX_LABEL_CHARS})")
    p.add_argument("--text-batch", type=int, default=TEXT_BATCH, metavar="N",
                   help=f"concurrent text queries encoded in one forward pass, at most (default {TEXT_BATCH}; "
                        "1 turns batching off)")
    p.add_argument("--batch-wait-ms", type=float, default=TEXT_BATCH_WAIT_MS, metavar="MS",
                   help=f"how long a text query waits for others to share its forward pass (default "
                        f"{TEXT_BATCH_WAIT_MS:g})")
    p.add_argument("--search-batch", type=int, default=SEARCH_BATCH, metavar="N",
                   help=f"searches of concurrent requests (text, upload, similar) waiting at the same time run as one "
                        f"backend call of at most N queries; nothing waits for company (default {SEARCH_BATCH}; 1 "
                        "searches each on its own)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="server processes sharing the port, each with its own model and index copy (default 1; "
                        "up to the number of cores; see below)")
    p.add_argument("--keep-alive", type=int, default=KEEP_ALIVE_SECONDS, metavar="SECONDS",
                   help=f"how long an idle client connection stays open (default {KEEP_ALIVE_SECONDS}). uvicorn's own "
                        "default, 5 s, is also httpx's and many clients' pool expiry: a client that reuses a "
                        "connection at the moment the server closes it gets a ReadError; keep this above your "
                        "clients' and load balancer's idle timeouts")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info: one line per request)")
    add_load_arguments(p)  # the same loading options the index was built with (--model-name, --trust-pickle, ...)


def run(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ValueError("clipforge serve needs fastapi and uvicorn: pip install 'clipforge[serve]'") from None
    from ..serve.app import create_app
    from ..serve.search import Searcher

    for name in ("max_upload_mb", "max_image_pixels", "decode_workers", "max_uploads", "max_labels",
                 "max_label_chars", "text_batch", "search_batch", "workers", "keep_alive"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    settings = {"searcher": dict(index_dir=str(args.index), model=args.model, backend=args.backend,
                                 max_image_pixels=args.max_image_pixels, nprobe=args.nprobe,
                                 ef_search=args.ef_search, load_options=load_options(args)),
                "app": dict(max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_labels=args.max_labels,
                            max_label_chars=args.max_label_chars, decode_workers=args.decode_workers,
                            max_uploads=args.max_uploads, text_batch=args.text_batch,
                            text_batch_wait_ms=args.batch_wait_ms, search_batch=args.search_batch)}
    # built here even for several workers: a bad index, model or option fails now, with its message, not in N
    # processes at once
    searcher = Searcher(**settings["searcher"])
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: the search API has no authentication and serves the indexed images "
              "to anyone who can reach this port", file=sys.stderr)
    processes = f", {args.workers} worker processes" if args.workers > 1 else ""
    print(f"serving {len(searcher)} images of {args.index} ({searcher.index_kind} index, "
          f"{searcher.backend.name} search{processes}) on "
          f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}", file=sys.stderr)
    if args.workers == 1:
        app = create_app(searcher, **settings["app"])
        freeze_loaded_objects()
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=args.keep_alive)
        return 0
    del searcher  # each worker loads its own
    # uvicorn starts workers from an import string; they read their settings from the environment it passes on
    os.environ[WORKER_SETTINGS] = json.dumps(settings)
    uvicorn.run(f"{__name__}:worker_app", factory=True, workers=args.workers, host=args.host, port=args.port,
                log_level=args.log_level, timeout_keep_alive=args.keep_alive)
    return 0


# seconds an idle keep-alive connection stays open: above the 5 s after which httpx (and many HTTP clients) drop idle
# pooled connections, so the server is never the side that closes a connection a client is about to reuse (with
# uvicorn's default of 5 s both sides expire together, and one request in 12,000 of a load test failed with a
# ReadError); nginx's default keepalive_timeout is the same 75 s
KEEP_ALIVE_SECONDS = 75
WORKER_SETTINGS = "CLIPFORGE_SERVE_WORKER"  # JSON of one worker's Searcher and create_app arguments


def worker_app():
    """The application of one ``--workers`` process, built from the settings ``run`` put in the environment."""
    from ..serve.app import create_app
    from ..serve.search import Searcher

    raw = os.environ.get(WORKER_SETTINGS)
    if not raw:
        raise RuntimeError(f"{WORKER_SETTINGS} is not set: worker_app is started by `clipforge serve --workers N`")
    settings = json.loads(raw)
    app = create_app(Searcher(**settings["searcher"]), **settings["app"])
    freeze_loaded_objects()
    return app


def freeze_loaded_objects() -> None:
    """Exempt everything loaded so far (torch, the model, the index's metadata, the web framework) from Python's
    cyclic garbage collector for the life of the server process (:func:`gc.freeze`, after one collection of what
    is garbage already).

    Why: a full (generation 2) collection walks every tracked object, and a server holding a model and an index
    has hundreds of thousands that live as long as it does. Under load such a collection starts every few seconds,
    holds the GIL for 130-190 ms (measured with ``gc.callbacks`` in a server of 100,000 items, Zen 5 EPYC) and
    every request in flight waits: those pauses were the text queries' p99 in ``bench_serve_load.py``. After the
    freeze a full collection walks only what was made since, about 2 ms there. Objects made while serving are
    collected as before. A frozen object that later becomes unreachable is still freed by reference counting; only
    a reference cycle among frozen objects would stay, and what was loaded before serving (the model, the index,
    the routes) is held until the process exits anyway. Done here, in the process that serves, and not in
    ``create_app``: freezing is process-wide, and an application built in a test or a notebook must not change its
    host's collector."""
    gc.collect()
    gc.freeze()
