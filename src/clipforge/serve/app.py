"""The web service behind ``clipforge serve``: JSON endpoints and one self-contained HTML page.

Endpoints (all read-only; nothing is written on the server):

- ``GET /`` the search page (``page.html``: vanilla JS, no external resources)
- ``GET /health`` status, image count, embedding dimension, model, backend
- ``GET /search?q=TEXT&k=10`` text -> image
- ``POST /search/image?k=10`` image -> image; a multipart form with the image in ``file``
- ``GET /search/similar/{id}?k=10`` images like an indexed one, from its stored embedding
- ``POST /classify`` zero-shot labels: multipart ``file`` and ``labels`` (comma-separated)
- ``GET /image/{id}[?size=256]`` an indexed image (the original bytes, or a thumbnail)

Search responses are ``{"query", "k", "took_ms", "count", "answered_by", "results": [{"id", "score", "key",
"caption", "kind", "path", "description", "url", "thumb"}]}``. ``answered_by`` says which index answered:
``{"index": "image"}`` (CLIP image embeddings) or ``{"index": "describe", "captioner", "sentence_encoder"}``
(a description index searched text-to-text, :mod:`clipforge.serve.describe`); ``/health`` carries the same record
and the page shows it. Errors are ``{"detail": message}`` with 400
(bad input), 404 (unknown id, missing or changed file), 413 (body, upload, image or label list
too large), 422 (invalid parameter) or 503 (all upload slots busy; ``Retry-After`` says when to
try again).

Limits, so that no request can exhaust the server (each a :func:`create_app` argument and a
``clipforge serve`` option):

- a request body is refused with 413 as soon as its declared ``Content-Length`` or the bytes
  received so far pass ``max_upload_bytes`` + 1 MiB for the form fields (:class:`RequestLimits`,
  an ASGI middleware counting the bytes as they arrive, before anything is parsed or spooled);
- at most ``max_uploads`` image uploads are in flight; one more is answered 503 at once, before
  its body is read; of those, ``decode_workers`` decode and embed at a time (thumbnails share
  these workers), the others wait;
- an image declaring more pixels than the searcher's limit is refused (413) from its header,
  before it is decoded (:func:`clipforge.images.load_image`);
- ``/classify`` takes at most ``max_labels`` labels of at most ``max_label_chars`` characters,
  and a template with exactly one ``{}`` or ``{c}``, filled in as text, never with ``str.format``.

FastAPI is imported inside :func:`create_app` so that ``clipforge.serve`` (the index and the
Searcher) works without the ``serve`` extra installed.
"""
# no ``from __future__ import annotations`` here: FastAPI reads the route signatures' annotations at
# runtime, and the fastapi types are imported inside create_app, out of reach of string annotations
import asyncio
import hashlib
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from functools import lru_cache
from importlib import resources
from typing import Any

from ..images import ImageTooLargeError
from .search import Searcher, check_template
from .search_batching import SEARCH_BATCH

MAX_K = 200
MAX_UPLOAD_BYTES = 20 << 20
FORM_BYTES = 1 << 20  # room for the form fields (labels, template) and the multipart framing around an upload
THUMB_SIZES = (16, 1024)
MAX_LABELS = 1000
MAX_LABEL_CHARS = 200
MAX_TEMPLATE_CHARS = 500
DECODE_WORKERS = 2
MAX_UPLOADS = 16
TEXT_BATCH = 32  # text queries encoded in one forward pass at most
TEXT_BATCH_WAIT_MS = 5.0  # how long the first query of a batch waits for others

log = logging.getLogger(__name__)
UPLOAD_PATHS = ("/search/image", "/classify")
CLOSE = [(b"connection", b"close")]


class _BodyTooLarge(Exception):
    """Raised into the application when the body passes the limit (not a ValueError: no handler turns it into 400)."""


class RequestLimits:
    """ASGI middleware: a body size limit enforced while the body streams in, and a bound on uploads in flight.

    The declared ``Content-Length`` is checked first; the body's bytes are then counted as the
    application reads them, whatever the header said (a chunked body declares none). Past
    ``max_body_bytes`` the client gets 413 at once and the application an exception, so nothing
    more is read, parsed or spooled. A POST to one of ``upload_paths`` while ``max_uploads``
    others are in flight gets 503 with ``Retry-After`` before its body is read (uvicorn drops the
    rest of that body as it arrives and keeps the connection). A 413 closes the connection, so
    a client that goes on sending is cut off instead of being read to the end.
    """

    def __init__(self, app, max_body_bytes: int, max_uploads: int, upload_paths=UPLOAD_PATHS):
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.max_uploads = int(max_uploads)
        self.upload_paths = tuple(upload_paths)
        self.uploads_in_flight = 0  # changed on the event loop only

    async def _answer(self, send, status: int, detail: str, headers=()) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": body})

    def _too_large(self, size: str) -> str:
        return (f"request body {size} is larger than the limit of {self.max_body_bytes:,} bytes "
                f"({(self.max_body_bytes - FORM_BYTES) >> 20} MiB for the file plus 1 MiB for the form); "
                "send a smaller image (clipforge serve --max-upload-mb raises the limit)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                await self._answer(send, 400, f"Content-Length {declared[:40]!r} is not a number")
                return
            if n > self.max_body_bytes:
                await self._answer(send, 413, self._too_large(f"of {n:,} bytes"), headers=CLOSE)
                return
        upload = scope.get("method") == "POST" and scope.get("path") in self.upload_paths
        if upload:
            if self.uploads_in_flight >= self.max_uploads:
                await self._answer(send, 503, f"server busy: {self.uploads_in_flight} image uploads are being "
                                              "processed; retry in a moment", headers=[(b"retry-after", b"1")])
                return
            self.uploads_in_flight += 1
        state = {"received": 0, "refused": False, "started": False}

        async def limited_receive():
            if state["refused"]:
                raise _BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body_bytes:
                    if not state["started"]:
                        state["refused"] = True
                        await self._answer(send, 413, self._too_large(f"of more than {self.max_body_bytes:,} bytes"),
                                           headers=CLOSE)
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            if state["refused"]:  # the 413 went out already: drop what the application answers
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        finally:
            if upload:
                self.uploads_in_flight -= 1


class DecodeWorkers:
    """At most ``n`` image decodes (and their forward passes) at a time; callers past that wait their turn."""

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"decode_workers must be >= 1, got {n}")
        self.n = n
        self._sem = threading.BoundedSemaphore(n)

    def run(self, fn, *args):
        with self._sem:
            return fn(*args)


class TextBatcher:
    """Dynamic batching of text queries: those arriving within ``wait_ms`` of each other share one forward pass.

    Callers (the server's worker threads) put their query on a queue and wait for their own
    answer; one thread takes the first waiting query, collects whatever else arrives in the next
    ``wait_ms`` milliseconds (at most ``max_batch`` queries), encodes them together with
    :meth:`Searcher.encode_text` and searches them together with :meth:`Searcher.vectors` (one backend call;
    each query keeps its own ``k``). A lone query
    waits at most ``wait_ms`` longer than it would without batching; under load, N concurrent
    queries cost about one forward pass instead of N serialized ones. An error of the batch is
    raised to each of its callers. ``stats``: queries answered and forward passes run.
    """

    def __init__(self, searcher: Searcher, max_batch: int = TEXT_BATCH, wait_ms: float = TEXT_BATCH_WAIT_MS):
        if max_batch < 1 or wait_ms < 0:
            raise ValueError(f"text batching needs max_batch >= 1 and wait_ms >= 0, got {max_batch} and {wait_ms}")
        self.searcher, self.max_batch, self.wait = searcher, int(max_batch), wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue()
        self._start = threading.Lock()
        self._thread: threading.Thread | None = None
        self.stats = {"queries": 0, "forwards": 0, "largest": 0}

    def search(self, text: str, k: int):
        """The hits of ``text`` (blocks the calling thread until its batch is answered)."""
        return self.submit(text, k).result()

    def submit(self, text: str, k: int) -> Future:
        """Queue ``text`` for the next batch; the future gets its hits (``await asyncio.wrap_future(...)`` on an
        event loop, so that no thread waits for it)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the text query is empty")
        with self._start:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="clipforge-text-batcher", daemon=True)
                self._thread.start()
        future: Future = Future()
        self._queue.put((text, k, future))
        return future

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                embeddings = self.searcher.encode_text([t for t, _, _ in batch])
                self.stats["forwards"] += 1
                self.stats["queries"] += len(batch)
                self.stats["largest"] = max(self.stats["largest"], len(batch))
                hits = self.searcher.vectors(embeddings, [k for _, k, _ in batch])  # one search call for the batch
                for (_, _, future), h in zip(batch, hits):
                    future.set_result(h)
            except Exception as e:  # noqa: BLE001 - handed to every caller of the batch
                log.exception("text batch of %d failed", len(batch))
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(e)


def page_html() -> str:
    """The search page, read from the package (``clipforge/serve/page.html``)."""
    return resources.files("clipforge.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(searcher: Searcher, max_upload_bytes: int = MAX_UPLOAD_BYTES, thumb_cache: int = 1024, *,
               max_labels: int = MAX_LABELS, max_label_chars: int = MAX_LABEL_CHARS,
               decode_workers: int = DECODE_WORKERS, max_uploads: int = MAX_UPLOADS, text_batch: int = TEXT_BATCH,
               text_batch_wait_ms: float = TEXT_BATCH_WAIT_MS, search_batch: int = SEARCH_BATCH):
    """A FastAPI application serving ``searcher``'s index (see the module docstring for the routes and limits).

    ``text_batch`` > 1: concurrent text searches arriving within ``text_batch_wait_ms`` are encoded
    together (:class:`TextBatcher`); 1 encodes each on its own. ``search_batch`` > 1: the searches of
    concurrent requests of every kind (text batches, uploads, "more like this") that are waiting at the same
    time share one backend call of at most that many queries (:meth:`Searcher.batch_searches`); 1 searches
    each on its own. Results are the same either way.

    The pixel limit of uploads and thumbnails is the searcher's (``Searcher(max_image_pixels=)``).
    """
    from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    for name, value in (("max_upload_bytes", max_upload_bytes), ("max_labels", max_labels),
                        ("max_label_chars", max_label_chars), ("max_uploads", max_uploads),
                        ("search_batch", search_batch)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    workers = DecodeWorkers(decode_workers)
    batcher = TextBatcher(searcher, text_batch, text_batch_wait_ms) if text_batch > 1 else None
    search_batcher = searcher.batch_searches(search_batch)
    app = FastAPI(title="clipforge search", version="1", docs_url="/docs", redoc_url=None)
    app.add_middleware(RequestLimits, max_body_bytes=max_upload_bytes + FORM_BYTES,
                       max_uploads=max(max_uploads, decode_workers))
    manifest = searcher.data.manifest
    # a version tag in image URLs: a rebuilt index (ids are row numbers) never shows a cached old image
    version = hashlib.sha256(json.dumps([manifest.get("updated"), manifest["count"],
                                         manifest["model"]["weights_sha256"]]).encode()).hexdigest()[:10]
    html = page_html()
    answered_by: dict[str, Any] = {"index": searcher.index_kind}
    if searcher.index_kind == "describe":
        rec = searcher.describe_record
        answered_by.update(captioner=rec.get("captioner"), method=rec.get("method"),
                           sentence_encoder=rec.get("sentence_encoder_name"))

    def hits_json(hits, query: Any, k: int, t0: float) -> dict[str, Any]:
        results = [{**h.to_dict(), "url": f"/image/{h.id}?v={version}", "thumb": f"/image/{h.id}?size=256&v={version}"}
                   for h in hits]
        return {"query": query, "k": k, "took_ms": round((time.perf_counter() - t0) * 1000, 2),
                "count": len(results), "answered_by": answered_by, "results": results}

    async def read_upload(file: UploadFile) -> bytes:
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_bytes:,} bytes "
                                     "(clipforge serve --max-upload-mb raises the limit)")
        if not data:
            raise HTTPException(400, "the uploaded file is empty")
        return data

    @lru_cache(maxsize=thumb_cache)
    def thumbnail(item_id: int, size: int, stamp: tuple) -> tuple[bytes, str]:
        # thumbnails only: they are small and cost a decode and a resize; originals are read each time.
        # ``stamp`` (the file checked just before) keys the cache, so a changed file is never answered from it
        return workers.run(searcher.image_bytes, item_id, size)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page():
        return HTMLResponse(html)

    @app.get("/health")
    def health():
        return {"status": "ok", "count": len(searcher), "dim": searcher.dim, "model": searcher.model_description,
                "backend": searcher.backend.name, "index": str(searcher.root), "dtype": manifest["dtype"],
                "sources": manifest.get("sources", []), "answered_by": answered_by, "process": os.getpid(),
                "text_batching": dict(batcher.stats, max_batch=batcher.max_batch) if batcher else None,
                "search_batching": dict(search_batcher.stats, max_rows=search_batcher.max_rows)
                if search_batcher else None}

    @app.get("/search")
    async def search_text(q: str = Query(..., min_length=1, max_length=1000, description="the text query"),
                          k: int = Query(10, ge=1, le=MAX_K, description="number of results")):
        t0 = time.perf_counter()
        try:
            if batcher is not None:  # the event loop awaits the batch: no worker thread is held per waiting query
                hits = await asyncio.wrap_future(batcher.submit(q, k))
            else:
                hits = await run_in_threadpool(searcher.text, q, k)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return hits_json(hits, q, k, t0)

    @app.post("/search/image")
    async def search_image(file: UploadFile = File(..., description="an image file"),
                           k: int = Query(10, ge=1, le=MAX_K)):
        t0 = time.perf_counter()
        data = await read_upload(file)
        try:
            hits = await run_in_threadpool(workers.run, searcher.image, data, k)  # off the event loop, bounded
        except ImageTooLargeError as e:
            raise HTTPException(413, f"{file.filename or 'upload'}: {e}") from None
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
        names = [l.strip() for l in labels.split(",") if l.strip()]
        if len(names) > max_labels:
            raise HTTPException(413, f"{len(names)} labels given; at most {max_labels} are classified in one request "
                                     "(split the list, or clipforge serve --max-labels raises the cap)")
        long = next((l for l in names if len(l) > max_label_chars), None)
        if long is not None:
            raise HTTPException(400, f"label {long[:40]!r}... has {len(long)} characters; at most {max_label_chars} "
                                     "are allowed (clipforge serve --max-label-chars)")
        if len(template) > MAX_TEMPLATE_CHARS:
            raise HTTPException(400, f"the template has {len(template)} characters; at most {MAX_TEMPLATE_CHARS}")
        try:
            check_template(template)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        data = await read_upload(file)
        try:
            probs = await run_in_threadpool(workers.run, searcher.classify, data, names, template)
        except ImageTooLargeError as e:
            raise HTTPException(413, f"{file.filename or 'upload'}: {e}") from None
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return {"labels": [{"label": l, "probability": p} for l, p in probs]}

    @app.get("/image/{item_id}")
    def image(item_id: int, size: int | None = Query(None, ge=THUMB_SIZES[0], le=THUMB_SIZES[1],
                                                     description="longest side of a thumbnail"),
              v: str | None = None):
        try:
            if size is None:
                data, mime = searcher.image_bytes(item_id)
            else:
                data, mime = thumbnail(item_id, size, searcher.item_stamp(item_id))
        except KeyError as e:
            raise HTTPException(404, e.args[0]) from None
        except FileNotFoundError as e:  # gone, or not the file indexed any more (ItemChangedError)
            raise HTTPException(404, str(e)) from None
        except ImageTooLargeError as e:
            raise HTTPException(413, str(e)) from None
        except ValueError as e:  # the file changed into something unreadable since it was indexed
            raise HTTPException(500, str(e)) from None
        cache = "public, max-age=86400, immutable" if v == version else "no-cache"
        return Response(data, media_type=mime, headers={"Cache-Control": cache})

    @app.exception_handler(ValueError)
    async def value_error(_, exc: ValueError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    return app
