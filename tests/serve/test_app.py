"""The web service through FastAPI's test client (no network), and once on a real 127.0.0.1 socket."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from servehelpers import LocalServer  # noqa: E402

import clipforge  # noqa: E402
from clipforge.cli.main import build_parser, main  # noqa: E402
from clipforge.serve.app import create_app  # noqa: E402


def test_page_is_self_contained_with_search_form(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert '<form id="search-form"' in html and 'name="q"' in html and 'type="file"' in html
    assert "drop" in html and "/search/image" in html and "/search?q=" in html
    # no CDN, no external resource: every URL the page uses is relative to the server
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", html)
    assert "http://" not in html and "https://" not in html


def test_health(client, searcher):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["count"] == 10 and h["dim"] == 32 and h["backend"] == "numpy"
    assert searcher.data.manifest["model"]["weights_sha256"][:12] in h["model"]


def test_text_search_matches_searcher(client, searcher):
    r = client.get("/search", params={"q": "a red circle", "k": 4})
    assert r.status_code == 200
    body = r.json()
    expected = searcher.text("a red circle", 4)
    assert body["count"] == 4 and [h["id"] for h in body["results"]] == [h.id for h in expected]
    assert [h["score"] for h in body["results"]] == pytest.approx([h.score for h in expected])
    first = body["results"][0]
    assert {"key", "caption", "path", "url", "thumb"} <= set(first) and first["url"].startswith(f"/image/{first['id']}")
    assert client.get("/search", params={"q": "x", "k": 0}).status_code == 422
    assert client.get("/search", params={"q": "x", "k": 10_000}).status_code == 422
    assert client.get("/search").status_code == 422
    assert client.get("/search", params={"q": "   "}).json()["detail"] == "the text query is empty"


def test_image_upload_search(client, searcher):
    path = searcher.data.meta["path"][3]
    with open(path, "rb") as f:
        data = f.read()
    r = client.post("/search/image", params={"k": 3}, files={"file": ("q.png", data, "image/png")})
    assert r.status_code == 200
    body = r.json()
    assert body["results"][0]["id"] == 3 and body["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert [h["id"] for h in body["results"]] == [h.id for h in searcher.image(path, 3)]
    bad = client.post("/search/image", files={"file": ("bad.jpg", b"\xff\xd8\xff nope", "image/jpeg")})
    assert bad.status_code == 400 and "bad.jpg" in bad.json()["detail"] and "corrupt" in bad.json()["detail"]
    big = client.post("/search/image", files={"file": ("big.png", b"0" * 200_001, "image/png")})
    assert big.status_code == 413
    assert client.post("/search/image", files={"file": ("e.png", b"", "image/png")}).status_code == 400
    assert client.post("/search/image").status_code == 422


def test_images_thumbnails_similar_classify(client, searcher):
    r = client.get("/image/2")
    assert r.status_code == 200 and r.content == open(searcher.data.meta["path"][2], "rb").read()
    assert r.headers["content-type"] == {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}[
        searcher.data.meta["ext"][2]]
    t = client.get("/image/2", params={"size": 16})
    assert t.status_code == 200 and max(clipforge.load_image(t.content).size) == 16
    assert client.get("/image/10").status_code == 404
    assert client.get("/image/-1").status_code == 404
    assert client.get("/image/abc").status_code == 422
    sim = client.get("/search/similar/5", params={"k": 2}).json()
    assert [h["id"] for h in sim["results"]] == [h.id for h in searcher.similar(5, 2)]
    assert client.get("/search/similar/99").status_code == 404
    img = open(searcher.data.meta["path"][0], "rb").read()
    c = client.post("/classify", files={"file": ("x.png", img, "image/png")}, data={"labels": "circle, star,square"})
    got = c.json()["labels"]
    assert {g["label"] for g in got} == {"circle", "star", "square"}
    assert sum(g["probability"] for g in got) == pytest.approx(1.0)
    assert (
        client.post("/classify", files={"file": ("x.png", img, "image/png")}, data={"labels": " , "}).status_code == 400
    )


def test_serve_binds_localhost_by_default():
    args = build_parser().parse_args(["serve", "some_index"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.model is None


def test_serve_unknown_index_is_one_clear_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no index at" in err and "clipforge index MODEL" in err and "Traceback" not in err


def test_serve_other_model_is_refused(searcher, other_model_dir, capsys):
    assert main(["serve", str(searcher.root), "--model", str(other_model_dir)]) == 2
    err = capsys.readouterr().err
    assert "was built with" in err and str(other_model_dir) in err and "--rebuild" in err


def test_real_server_on_localhost(searcher):
    pytest.importorskip("uvicorn")
    with LocalServer(create_app(searcher)) as base:
        with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
            assert json.loads(r.read())["count"] == 10
        with urllib.request.urlopen(f"{base}/search?q=a%20blue%20star&k=3", timeout=10) as r:
            assert [h["id"] for h in json.loads(r.read())["results"]] == [h.id for h in searcher.text("a blue star", 3)]
        with urllib.request.urlopen(f"{base}/", timeout=10) as r:
            assert b'id="search-form"' in r.read()
