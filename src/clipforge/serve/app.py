"""The web service behind ``clipforge serve``: JSON endpoints and one self-contained HTML page.

Endpoints (all read-only; nothing is written on the server):

- ``GET /`` the search page (``page.html``: vanilla JS, no external resources)
- ``GET /health`` status, image count, embedding dimension, model, backend
- ``GET /search?q=TEXT&k=10`` text -> image
- ``POST /search/image?k=10`` image -> image; a multipart form with the image in ``file``
- ``GET /search/similar/{id}?k=10`` images like an indexed one, from its stored embedding
- ``POST /classify`` zero-shot labels: multipart ``file`` and ``labels`` (comma-separated)
- ``GET /image/{id}[?size=256]`` an indexed image (the original bytes, or a thumbnail)

Search responses are ``{"query", "k", "took_ms", "count", "results": [{"id", "score", "key",
"caption", "kind", "path", "url", "thumb"}]}``. Errors are ``{"detail": message}`` with 400
(bad input), 404 (unknown id, missing file), 413 (upload too large) or 422 (invalid parameter).

FastAPI is imported inside :func:`create_app` so that ``clipforge.serve`` (the index and the
Searcher) works without the ``serve`` extra installed.
"""
# no ``from __future__ import annotations`` here: FastAPI reads the route signatures' annotations at
# runtime, and the fastapi types are imported inside create_app, out of reach of string annotations
import hashlib
import json
import time
from functools import lru_cache
from importlib import resources
from typing import Any

from .search import Searcher

MAX_K = 200
MAX_UPLOAD_BYTES = 20 << 20
THUMB_SIZES = (16, 1024)


def page_html() -> str:
    """The search page, read from the package (``clipforge/serve/page.html``)."""
    return resources.files("clipforge.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(searcher: Searcher, max_upload_bytes: int = MAX_UPLOAD_BYTES, thumb_cache: int = 1024):
    """A FastAPI application serving ``searcher``'s index (see the module docstring for the routes)."""
    from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="clipforge search", version="1", docs_url="/docs", redoc_url=None)
    manifest = searcher.data.manifest
    # a version tag in image URLs: a rebuilt index (ids are row numbers) never shows a cached old image
    version = hashlib.sha256(json.dumps([manifest.get("updated"), manifest["count"],
                                         manifest["model"]["weights_sha256"]]).encode()).hexdigest()[:10]
    html = page_html()

    def hits_json(hits, query: Any, k: int, t0: float) -> dict[str, Any]:
        results = [{**h.to_dict(), "url": f"/image/{h.id}?v={version}", "thumb": f"/image/{h.id}?size=256&v={version}"}
                   for h in hits]
        return {"query": query, "k": k, "took_ms": round((time.perf_counter() - t0) * 1000, 2),
                "count": len(results), "results": results}

    async def read_upload(file: UploadFile) -> bytes:
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_bytes >> 20} MiB")
        if not data:
            raise HTTPException(400, "the uploaded file is empty")
        return data

    @lru_cache(maxsize=thumb_cache)
    def thumbnail(item_id: int, size: int) -> tuple[bytes, str]:
        # thumbnails only: they are small and cost a decode and a resize; originals are read each time
        return searcher.image_bytes(item_id, size)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page():
        return HTMLResponse(html)

    @app.get("/health")
    def health():
        return {"status": "ok", "count": len(searcher), "dim": searcher.dim, "model": searcher.model_description,
                "backend": searcher.backend.name, "index": str(searcher.root), "dtype": manifest["dtype"],
                "sources": manifest.get("sources", [])}

    @app.get("/search")
    def search_text(q: str = Query(..., min_length=1, max_length=1000, description="the text query"),
                    k: int = Query(10, ge=1, le=MAX_K, description="number of results")):
        t0 = time.perf_counter()
        try:
            hits = searcher.text(q, k)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return hits_json(hits, q, k, t0)

    @app.post("/search/image")
    async def search_image(file: UploadFile = File(..., description="an image file"),
                           k: int = Query(10, ge=1, le=MAX_K)):
        t0 = time.perf_counter()
        data = await read_upload(file)
        try:
            hits = await run_in_threadpool(searcher.image, data, k)  # the forward pass off the event loop
        except ValueError as e:  # clipforge.images.ImageLoadError is a ValueError
            raise HTTPException(400, f"{file.filename or 'upload'}: {e}") from None
        return hits_json(hits, {"filename": file.filename, "bytes": len(data)}, k, t0)

    @app.get("/search/similar/{item_id}")
    def search_similar(item_id: int, k: int = Query(10, ge=1, le=MAX_K)):
        t0 = time.perf_counter()
        try:
            hits = searcher.similar(item_id, k)
        except KeyError as e:
            raise HTTPException(404, e.args[0]) from None
        return hits_json(hits, {"id": item_id, **searcher.item(item_id)}, k, t0)

    @app.post("/classify")
    async def classify(file: UploadFile = File(...), labels: str = Form(..., description="comma-separated labels"),
                       template: str = Form("a photo of {}.")):
        data = await read_upload(file)
        names = [l.strip() for l in labels.split(",") if l.strip()]
        try:
            probs = await run_in_threadpool(searcher.classify, data, names, template)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return {"labels": [{"label": l, "probability": p} for l, p in probs]}

    @app.get("/image/{item_id}")
    def image(item_id: int, size: int | None = Query(None, ge=THUMB_SIZES[0], le=THUMB_SIZES[1],
                                                     description="longest side of a thumbnail"),
              v: str | None = None):
        try:
            data, mime = thumbnail(item_id, size) if size is not None else searcher.image_bytes(item_id)
        except KeyError as e:
            raise HTTPException(404, e.args[0]) from None
        except FileNotFoundError as e:
            raise HTTPException(404, str(e)) from None
        except ValueError as e:  # the file changed into something unreadable since it was indexed
            raise HTTPException(500, str(e)) from None
        cache = "public, max-age=86400, immutable" if v == version else "no-cache"
        return Response(data, media_type=mime, headers={"Cache-Control": cache})

    @app.exception_handler(ValueError)
    async def value_error(_, exc: ValueError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    return app
