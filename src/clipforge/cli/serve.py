"""``clipforge serve``: a search page and JSON API over an index built by ``clipforge index``."""
from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  clipforge serve indexes/emoji-test                  # http://127.0.0.1:8000
  clipforge serve indexes/pictures --model runs/a/checkpoints/step_3000 --port 8080

endpoints:
  GET  /                        the search page: text box, image upload / drag-and-drop / paste, result grid
  GET  /search?q=TEXT&k=10      text -> image, JSON {"results": [{"id", "score", "key", "caption", "url", ...}]}
  POST /search/image?k=10       image -> image (multipart form, field "file")
  GET  /search/similar/ID?k=10  images like an indexed one
  POST /classify                zero-shot labels (multipart "file", "labels"="cat, dog, car")
  GET  /image/ID[?size=256]     the image (or a thumbnail)
  GET  /health                  count, dimension, model, backend
  GET  /docs                    the API's interactive OpenAPI page

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
                   help="exact search with faiss (if installed: auto) or numpy; both give the same ranking")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ValueError("clipforge serve needs fastapi and uvicorn: pip install 'clipforge[serve]'") from None
    from ..serve.app import create_app
    from ..serve.search import Searcher

    searcher = Searcher(args.index, model=args.model, backend=args.backend)
    app = create_app(searcher)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: the search API has no authentication and serves the indexed images "
              "to anyone who can reach this port", file=sys.stderr)
    print(f"serving {len(searcher)} images of {args.index} ({searcher.backend.name} search) on "
          f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
