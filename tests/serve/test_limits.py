"""One request must not take the server down: classify caps and templates, decoding limits, body limits,
bounded upload workers, and /image/ID serving only the files the index recorded."""
from __future__ import annotations

import asyncio
import os
import select
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from servehelpers import LocalServer  # noqa: E402

import clipforge  # noqa: E402
from clipforge.cli.main import main  # noqa: E402
from clipforge.serve import Searcher  # noqa: E402
from clipforge.serve.app import create_app  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_images import bomb_png, peak_rss_mb, peak_rss_reset  # noqa: E402


def _img(searcher, i=0) -> bytes:
    return Path(searcher.data.meta["path"][i]).read_bytes()


# ---------------------------------------------------------------- /classify


def _reference_probs(model_dir, image: bytes, texts: list[str]) -> np.ndarray:
    """Zero-shot probabilities computed here from the model itself (not through Searcher.classify)."""
    model, tokenizer, preprocess = clipforge.load(model_dir)
    with torch.no_grad():
        img = model.encode_image(preprocess(clipforge.load_image(image)).unsqueeze(0))[0]
        txt = model.encode_text(tokenizer(texts))
        return (model.scale() * (txt @ img)).softmax(-1).numpy()


@pytest.mark.parametrize("template", ["{0.__class__}", "{0.__class__.__init__.__globals__}", "{:>100000000}",
                                      "{} {x}", "a photo of a thing", "{} and {}", "{c} or {}", "{0}", "{c!r}",
                                      "{{}}", "a {} }", "{ }", "{c:>9}"])
def test_hostile_or_malformed_templates_are_a_400_naming_the_rule(client, searcher, template):
    r = client.post("/classify", files={"file": ("x.png", _img(searcher), "image/png")},
                    data={"labels": "circle, star", "template": template})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "exactly one" in detail and "{}" in detail and "{c}" in detail


def test_templates_substitute_the_label_literally(client, searcher, model_dir):
    img = _img(searcher)
    labels = ["circle", "{0.__class__}", "a {} b"]  # braces in labels are text, never format fields
    for template, fill in (("a photo of {}.", "a photo of {}."), ("{c}, a shape", "{}, a shape")):
        r = client.post("/classify", files={"file": ("x.png", img, "image/png")},
                        data={"labels": ",".join(labels), "template": template})
        assert r.status_code == 200, r.text
        got = {g["label"]: g["probability"] for g in r.json()["labels"]}
        texts = [fill.replace("{}", "\0").replace("\0", lab) for lab in labels]
        assert texts[1] == ("a photo of {0.__class__}." if template.startswith("a photo") else "{0.__class__}, a shape")
        want = _reference_probs(model_dir, img, texts)
        assert [got[lab] for lab in labels] == pytest.approx(want.tolist(), abs=1e-4)


def test_classify_caps_labels_and_their_length(searcher):
    client = TestClient(create_app(searcher, max_labels=5, max_label_chars=12))
    img = _img(searcher)

    def post(labels):
        return client.post("/classify", files={"file": ("x.png", img, "image/png")}, data={"labels": labels})

    assert post("a,b,c,d,e").status_code == 200
    r = post("a,b,c,d,e,f")
    assert r.status_code == 413 and "6 labels" in r.json()["detail"] and "at most 5" in r.json()["detail"]
    r = post("a," + "x" * 13)
    assert r.status_code == 400 and "13 characters" in r.json()["detail"] and "12" in r.json()["detail"]
    assert post("a," + "x" * 12).status_code == 200
    r = client.post("/classify", files={"file": ("x.png", img, "image/png")},
                    data={"labels": "a", "template": "{}" + "x" * 1000})
    assert r.status_code == 400 and "template" in r.json()["detail"]


def test_classify_default_caps_refuse_ten_thousand_labels_fast(client, searcher):
    labels = ",".join(f"label number {i}" for i in range(10_000))
    t0 = time.perf_counter()
    r = client.post("/classify", files={"file": ("x.png", _img(searcher), "image/png")}, data={"labels": labels})
    assert r.status_code == 413 and "10000 labels" in r.json()["detail"]
    assert time.perf_counter() - t0 < 2.0  # refused before anything is embedded


# ---------------------------------------------------------------- decoding limits


def test_decompression_bomb_upload_is_413_and_memory_stays_low(client):
    bomb = bomb_png()
    if not peak_rss_reset():
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    base = peak_rss_mb()
    for path in ("/search/image", "/classify"):
        r = client.post(path, files={"file": ("bomb.png", bomb, "image/png")}, data={"labels": "a, b"})
        assert r.status_code == 413, r.text
        assert "bomb.png" in r.json()["detail"] and "13000 x 13000" in r.json()["detail"]
    grew = peak_rss_mb() - base
    assert grew < 100, f"peak RSS grew by {grew:.0f} MB (decoding it takes 0.7 GB)"
    assert client.get("/search", params={"q": "a red circle"}).status_code == 200  # still serving


def test_server_pixel_limit_applies_to_thumbnails(model_dir, image_dir, tmp_path):
    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(out), "--quiet"]) == 0
    s = Searcher(out, backend="numpy", max_image_pixels=1000)  # the 48 x 48 images have 2304
    client = TestClient(create_app(s))
    assert client.get("/image/0").status_code == 200  # the original bytes: nothing decoded
    r = client.get("/image/0", params={"size": 32})
    assert r.status_code == 413 and "2,304 pixels" in r.json()["detail"]


def _read_response(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def test_oversized_declared_body_is_refused_before_it_is_sent(searcher):
    pytest.importorskip("uvicorn")
    with LocalServer(create_app(searcher, max_upload_bytes=200_000)) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /search/image HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 1000000000\r\n\r\n")
            head = _read_response(sock, timeout=5)  # not one byte of the body was sent
        assert head.startswith(b"HTTP/1.1 413"), head[:200]


PART_HEAD = (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
             b"Content-Type: image/png\r\n\r\n")  # a well-formed multipart file part that never ends


def _stream_until_answered(port: int, headers: bytes, total: int, chunked: bool) -> tuple[bytes, int]:
    """Send a multipart body of ``total`` bytes in 64 KiB pieces, stopping as soon as the server answers."""
    piece = b"\0" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(headers)
        try:
            while sent < total:
                if select.select([sock], [], [], 0)[0]:
                    break
                data = PART_HEAD + piece if sent == 0 else piece
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                sent += len(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return _read_response(sock, timeout=10), sent


def test_oversized_streamed_body_is_refused_early_without_content_length(searcher):
    pytest.importorskip("uvicorn")
    with LocalServer(create_app(searcher, max_upload_bytes=200_000)) as base:
        port = int(base.rsplit(":", 1)[1])
        total = 64 << 20
        head, sent = _stream_until_answered(
            port, b"POST /search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n", total, chunked=True)
        assert head.startswith(b"HTTP/1.1 413"), head[:200]
        # refused once the limit (200 KB + 1 MiB for the form) passed, not after all 64 MiB were spooled;
        # what the kernel's socket buffers took in before the answer arrived is the slack
        assert sent < 16 << 20, f"{sent} bytes were sent before the answer"
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200  # and it keeps serving


def test_body_longer_than_its_content_length_is_counted_not_trusted(searcher):
    """At the ASGI level (a server may pass on more than a lying Content-Length declared): bytes are counted."""
    app = create_app(searcher, max_upload_bytes=200_000)
    chunk, chunks = b"\0" * (256 << 10), 200  # 50 MiB offered
    received = []
    sent: list[dict] = []

    async def receive():
        if len(received) < chunks:
            received.append(1)
            body = (PART_HEAD if len(received) == 1 else b"") + chunk
            return {"type": "http.request", "body": body, "more_body": True}
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append({**message, "received_then": len(received)})

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/search/image", "raw_path": b"/search/image", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"t"), (b"content-length", b"100"),
                         (b"content-type", b"multipart/form-data; boundary=xyz")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    asyncio.run(app(scope, receive, send))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1 and starts[0]["status"] == 413
    limit = 200_000 + (1 << 20)
    # answered as soon as the count passed the limit, though the header declared 100 bytes
    assert starts[0]["received_then"] * len(chunk) <= limit + len(chunk)
    # and nothing more was read after that
    assert len(received) == starts[0]["received_then"] < chunks


def test_uploads_beyond_the_worker_bound_get_503_fast(searcher):
    pytest.importorskip("uvicorn")
    entered, release = threading.Event(), threading.Event()
    real_image = searcher.image

    def slow_image(data, k):
        entered.set()
        release.wait(30)
        return real_image(data, k)

    searcher.image = slow_image
    img = _img(searcher)
    results = {}
    with LocalServer(create_app(searcher, decode_workers=1, max_uploads=1)) as base:
        def first():
            with httpx.Client(timeout=30) as c:
                results["first"] = c.post(f"{base}/search/image", files={"file": ("q.png", img, "image/png")})

        t = threading.Thread(target=first)
        t.start()
        try:
            assert entered.wait(20)
            with httpx.Client(timeout=5) as c:
                t0 = time.perf_counter()
                r = c.post(f"{base}/search/image", files={"file": ("q.png", img, "image/png")})
                took = time.perf_counter() - t0
                assert r.status_code == 503 and "busy" in r.json()["detail"] and r.headers["retry-after"]
                assert took < 2.0
                r = c.post(f"{base}/classify", files={"file": ("q.png", img, "image/png")}, data={"labels": "a"})
                assert r.status_code == 503
                for _ in range(3):  # a larger body still gets its 503 (the rest is dropped), not a reset connection
                    r = c.post(f"{base}/search/image", files={"file": ("big.png", b"\0" * (4 << 20), "image/png")})
                    assert r.status_code == 503
                assert c.get(f"{base}/search", params={"q": "a star"}).status_code == 200  # text still served
        finally:
            release.set()
            t.join(30)
        assert results["first"].status_code == 200
        with httpx.Client(timeout=10) as c:  # the slot is free again
            assert c.post(f"{base}/search/image", files={"file": ("q.png", img, "image/png")}).status_code == 200


# ---------------------------------------------------------------- /image/ID


def _same_stat(src: Path, dst: Path) -> None:
    st = src.stat()
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_image_swapped_for_a_symlink_after_indexing_is_404(searcher, client, tmp_path):
    i = 1
    path = Path(searcher.data.meta["path"][i])
    assert client.get(f"/image/{i}").status_code == 200
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    shutil.copyfile(path, secret)  # same size; same mtime below: only where it lives differs
    _same_stat(path, secret)
    path.unlink()
    path.symlink_to(secret)
    for params in ({}, {"size": 32}):
        r = client.get(f"/image/{i}", params=params)
        assert r.status_code == 404 and "outside the indexed folders" in r.json()["detail"]
    # a symlinked folder swapped in for an indexed one is caught the same way
    j = next(j for j, p in enumerate(searcher.data.meta["path"]) if "/b/c/" in p)
    folder = Path(searcher.data.meta["path"][j]).parent
    shutil.copytree(folder, outside / "c", copy_function=shutil.copy2)
    shutil.rmtree(folder)
    folder.symlink_to(outside / "c")
    assert client.get(f"/image/{j}").status_code == 404


def test_image_replaced_after_indexing_is_404(searcher, client):
    a, b = Path(searcher.data.meta["path"][0]), Path(searcher.data.meta["path"][3])
    assert client.get("/image/0", params={"size": 32}).status_code == 200  # a cached thumbnail ...
    a.write_bytes(b.read_bytes())  # other content (other size and mtime)
    for params in ({}, {"size": 32}):  # ... is not served once the file changed
        r = client.get("/image/0", params=params)
        assert r.status_code == 404 and "changed since it was indexed" in r.json()["detail"]
    assert client.get("/image/3").status_code == 200


def test_symlink_inside_the_indexed_folder_is_served(model_dir, image_dir, tmp_path):
    target = next(image_dir.rglob("*.png"))
    (image_dir / "link.png").symlink_to(target)
    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(out), "--quiet"]) == 0
    s = Searcher(out, backend="numpy")
    i = s.data.meta["key"].index((image_dir.resolve() / "link.png").as_posix())
    r = TestClient(create_app(s)).get(f"/image/{i}")
    assert r.status_code == 200 and r.content == target.read_bytes()


def test_corpus_shard_swapped_or_changed_is_404(model_dir, corpus_dir, tmp_path):
    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--corpus", "toy", "--corpus-root", str(corpus_dir), "--split", "test",
                 "--out", str(out), "--quiet"]) == 0
    s = Searcher(out, backend="numpy")
    client = TestClient(create_app(s))
    assert client.get("/image/0").status_code == 200
    shard = Path(s.data.meta["path"][0])
    copy = tmp_path / "copy.tar"
    shutil.copyfile(shard, copy)
    _same_stat(shard, copy)
    shard.unlink()
    shard.symlink_to(copy)
    assert client.get("/image/0").status_code == 404
    shard.unlink()
    shutil.copyfile(copy, shard)  # the same bytes, rewritten later: the shard's time no longer matches
    assert client.get("/image/0").status_code == 404


def test_old_corpus_index_without_shard_times_is_served_and_upgraded(model_dir, corpus_dir, tmp_path, capsys):
    """Indexes written before shard times were recorded (mtime_ns 0): served with the path and range checks,
    and the next `clipforge index` run records the times without re-embedding anything."""
    from clipforge.serve.index import _write, open_index

    out = tmp_path / "idx"
    cmd = ["index", str(model_dir), "--corpus", "toy", "--corpus-root", str(corpus_dir), "--split", "test",
           "--out", str(out), "--quiet"]
    assert main(cmd) == 0
    data = open_index(out)
    recorded = list(data.meta["mtime_ns"])
    assert all(t > 0 for t in recorded)
    old_meta = {**data.meta, "mtime_ns": [0] * len(data)}
    _write(out, data.manifest, data.embeddings, old_meta)
    assert TestClient(create_app(Searcher(out, backend="numpy"))).get("/image/0").status_code == 200
    capsys.readouterr()
    assert main(cmd) == 0
    assert "(0 added, 0 re-embedded, 6 unchanged" in capsys.readouterr().out
    upgraded = open_index(out)
    assert upgraded.meta["mtime_ns"] == recorded
    np.testing.assert_array_equal(upgraded.embeddings, data.embeddings)


def test_index_skips_a_decompression_bomb_with_the_reason(model_dir, image_dir, tmp_path, capsys):
    (image_dir / "bomb.png").write_bytes(bomb_png())
    if not peak_rss_reset():
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    base = peak_rss_mb()
    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "10 images (10 added" in captured.out and "skipped 1 unreadable" in captured.out
    err = captured.err
    assert "bomb.png" in err and "13000 x 13000" in err and "CLIPFORGE_MAX_IMAGE_PIXELS" in err
    assert peak_rss_mb() - base < 150  # loading the model and 10 small images; decoding the bomb takes 0.7 GB


def test_serve_options_reach_the_app(searcher, monkeypatch, capsys):
    """clipforge serve's limit options are the app's limits (uvicorn.run is replaced: no socket is opened)."""
    uvicorn = pytest.importorskip("uvicorn")
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    assert main(["serve", str(searcher.root), "--max-labels", "2", "--max-label-chars", "5", "--max-image-pixels",
                 "1000", "--max-upload-mb", "0.01"]) == 0
    client = TestClient(apps[0])
    img = _img(searcher)
    r = client.post("/classify", files={"file": ("x.png", img, "image/png")}, data={"labels": "a,b,c"})
    assert r.status_code == 413 and "at most 2" in r.json()["detail"]
    r = client.post("/classify", files={"file": ("x.png", img, "image/png")}, data={"labels": "a,bbbbbb"})
    assert r.status_code == 400
    assert client.get("/image/0", params={"size": 32}).status_code == 413  # 48 x 48 > 1000 pixels
    big = client.post("/search/image", files={"file": ("q.png", b"\0" * 20_000, "image/png")})
    assert big.status_code == 413  # over 0.01 MiB
    assert main(["serve", str(searcher.root), "--max-labels", "0"]) == 2
    assert "--max-labels must be positive" in capsys.readouterr().err
