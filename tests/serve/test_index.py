"""clipforge index: what is written, incremental re-runs, unreadable images, model identity, corpora."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.cli.main import main
from clipforge.serve import ModelMismatchError, build_index, open_index, scan_folders, weights_sha256
from clipforge.serve.index import IndexNotFoundError, read_item_bytes


def _encode(model_dir, paths):
    model, _, preprocess = clipforge.load(model_dir)
    with torch.no_grad():
        return model.encode_image(torch.stack([preprocess(clipforge.load_image(p)) for p in paths])).numpy()


def test_index_folder_writes_embeddings_metadata_manifest(model_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(out), "--dtype", "float32",
                 "--quiet"]) == 0
    assert "10 images (10 added" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    model, _, _ = clipforge.load(model_dir)
    assert manifest["count"] == 10 and manifest["dim"] == 32 and manifest["dtype"] == "float32"
    assert manifest["model"]["weights_sha256"] == weights_sha256(model)
    assert manifest["model"]["source"] == str(model_dir.resolve())
    assert manifest["sources"] == [{"kind": "images", "paths": [str(image_dir.resolve())]}]
    table = pq.read_table(out / "metadata.parquet").to_pydict()
    assert table["id"] == list(range(10))
    files = sorted(p for p in image_dir.rglob("*") if p.suffix in (".png", ".jpg", ".webp"))
    assert sorted(table["path"]) == sorted(p.resolve().as_posix() for p in files)
    # captions come from the sidecar .txt files (even-numbered images)
    for path, caption in zip(table["path"], table["caption"]):
        sidecar = os.path.splitext(path)[0] + ".txt"
        assert caption == (open(sidecar).read().strip() if os.path.exists(sidecar) else None)
    emb = np.load(out / "embeddings.npy")
    assert emb.dtype == np.float32 and emb.shape == (10, 32)
    np.testing.assert_allclose(emb, _encode(model_dir, table["path"]), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_float16_storage_is_close_to_float32(model_dir, image_dir, tmp_path):
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(tmp_path / "h"), "--quiet"]) == 0
    data = open_index(tmp_path / "h")
    assert data.embeddings.dtype == np.float16
    np.testing.assert_allclose(data.embeddings.astype(np.float32), _encode(model_dir, data.meta["path"]), atol=2e-3)


def test_incremental_reruns_embed_only_new_and_changed(model_dir, image_dir, tmp_path):
    model, _, preprocess = clipforge.load(model_dir)
    calls = []

    def counting(img):
        calls.append(1)
        return preprocess(img)

    out = tmp_path / "idx"

    def build():
        calls.clear()
        cands, roots = scan_folders([image_dir])
        return build_index(model, counting, out, cands, model_source=model_dir, folder_roots=roots,
                           dtype="float32", progress=False)

    r = build()
    assert (r.added, r.unchanged, len(calls)) == (10, 0, 10)
    before = open_index(out)
    stamp = [(out / f).stat().st_mtime_ns for f in ("manifest.json", "embeddings.npy", "metadata.parquet")]
    r = build()  # nothing changed: nothing embedded, nothing rewritten
    assert (r.added, r.updated, r.unchanged, r.removed, len(calls)) == (0, 0, 10, 0, 0)
    assert [(out / f).stat().st_mtime_ns for f in ("manifest.json", "embeddings.npy", "metadata.parquet")] == stamp

    # one new image, one changed image (new content, size and mtime), one deleted, one caption edited
    shapes = sorted(image_dir.rglob("img*.png"))
    new = image_dir / "b" / "new.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(new)
    changed = shapes[0]
    Image.new("RGB", (52, 44), (250, 250, 0)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    deleted = shapes[1]
    deleted.unlink()
    captioned = image_dir / "b" / "c" / "img6.png"  # untouched image whose sidecar caption is edited
    captioned.with_suffix(".txt").write_text("an edited caption\n")
    r = build()
    assert (r.added, r.updated, r.unchanged, r.removed, len(calls)) == (1, 1, 8, 1, 2)
    after = open_index(out)
    assert len(after) == 10 and after.manifest["count"] == 10
    keys = after.meta["key"]
    assert deleted.resolve().as_posix() not in keys
    row = keys.index(changed.resolve().as_posix())
    np.testing.assert_allclose(after.embeddings[row], _encode(model_dir, [changed])[0], atol=1e-5)
    assert after.meta["caption"][keys.index(captioned.resolve().as_posix())] == "an edited caption"
    # the rows of untouched images kept their embeddings
    for i, k in enumerate(before.meta["key"]):
        if k in keys and k != changed.resolve().as_posix():
            np.testing.assert_array_equal(after.embeddings[keys.index(k)], before.embeddings[i])


def test_corrupt_images_are_skipped_and_counted(model_dir, image_dir, tmp_path, capsys):
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (image_dir / "a" / "empty.png").write_bytes(b"")
    good = Image.open(next(image_dir.rglob("img0.png")))
    import io

    buf = io.BytesIO()
    good.save(buf, "PNG")
    (image_dir / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(out), "--quiet"]) == 0
    cap = capsys.readouterr()
    assert "10 images (10 added" in cap.out and "skipped 3 unreadable" in cap.out
    for name in ("broken.jpg", "empty.png", "truncated.png"):
        assert name in cap.err
    assert "3 unreadable image(s) were skipped" in cap.err
    keys = open_index(out).meta["key"]
    assert len(keys) == 10 and not any(k.endswith(("broken.jpg", "empty.png", "truncated.png")) for k in keys)


def test_other_model_is_refused_naming_both(model_dir, other_model_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(out), "--quiet"]) == 0
    model_b, _, pre_b = clipforge.load(other_model_dir)
    cands, _ = scan_folders([image_dir])
    with pytest.raises(ModelMismatchError) as e:
        build_index(model_b, pre_b, out, cands, model_source=other_model_dir, progress=False)
    msg = str(e.value)
    model_a, _, _ = clipforge.load(model_dir)
    assert weights_sha256(model_a)[:12] in msg and weights_sha256(model_b)[:12] in msg
    assert str(model_dir.resolve()) in msg and str(other_model_dir.resolve()) in msg and "--rebuild" in msg
    capsys.readouterr()
    assert main(["index", str(other_model_dir), "--images", str(image_dir), "--out", str(out), "--quiet"]) == 2
    assert "--rebuild" in capsys.readouterr().err
    assert main(["index", str(other_model_dir), "--images", str(image_dir), "--out", str(out), "--quiet",
                 "--rebuild"]) == 0
    assert open_index(out).manifest["model"]["weights_sha256"] == weights_sha256(model_b)


def test_interrupted_build_keeps_committed_work(model_dir, image_dir, tmp_path):
    model, _, preprocess = clipforge.load(model_dir)
    seen = []

    def dies_after_five(img):
        if len(seen) == 5:
            raise KeyboardInterrupt
        seen.append(1)
        return preprocess(img)

    cands, roots = scan_folders([image_dir])
    with pytest.raises(KeyboardInterrupt):
        build_index(model, dies_after_five, tmp_path / "idx", cands, model_source=model_dir, folder_roots=roots,
                    batch_size=2, commit_every=2, progress=False)
    partial = open_index(tmp_path / "idx")  # consistent: 2 batches of 2 were committed
    assert len(partial) == 4 and partial.meta["key"] == [c.row["key"] for c in cands[:4]]
    r = build_index(model, preprocess, tmp_path / "idx", cands, model_source=model_dir, folder_roots=roots,
                    progress=False)
    assert (r.added, r.unchanged, r.count) == (6, 4, 10)


def test_index_corpus_split(model_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--corpus", "toy", "--corpus-root", str(corpus_dir), "--split", "test",
                 "--languages", "en", "--out", str(out), "--quiet"]) == 0
    data = open_index(out)
    assert data.meta["key"] == [f"toy/test/s{i:03d}" for i in range(6, 12)]
    assert all(c and not c.startswith("eine Form") for c in data.meta["caption"])  # English captions kept
    assert len({p for p in data.meta["path"]}) > 1  # several shards
    from clipforge.data.shards import ShardDataset

    ds = ShardDataset(corpus_dir, "test")
    for i in range(len(ds)):
        # the byte range recorded for serving decodes to the very image the corpus reader returns
        img = clipforge.load_image(read_item_bytes(data.row(i)))
        np.testing.assert_array_equal(np.asarray(img).transpose(2, 0, 1), ds[i]["image"].numpy())
        assert data.meta["caption"][i] == ds[i]["captions"][1]
    from clipforge.serve import Searcher

    s = Searcher(out)
    data, mime = s.image_bytes(2)
    assert mime == "image/png" and data == read_item_bytes(s.item(2))
    hit = s.image(data, 1)[0]  # a corpus image finds itself; corpus hits have no file path
    assert hit.id == 2 and hit.kind == "corpus" and hit.path is None and hit.key == "toy/test/s008"
    capsys.readouterr()
    assert main(["index", str(model_dir), "--corpus", "toy", "--corpus-root", str(corpus_dir), "--split", "test",
                 "--out", str(out), "--quiet"]) == 0
    assert "0 added, 0 re-embedded, 6 unchanged" in capsys.readouterr().out
    assert main(["index", str(model_dir), "--corpus", "toy", "--corpus-root", str(corpus_dir), "--split", "nope",
                 "--out", str(out), "--quiet"]) == 2
    assert "available: ['test', 'train']" in capsys.readouterr().err


def test_unknown_index_and_missing_corpus_are_clear(model_dir, tmp_path, capsys):
    with pytest.raises(IndexNotFoundError, match="clipforge index MODEL --images DIR --out"):
        open_index(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(IndexNotFoundError, match="not a clipforge index"):
        open_index(tmp_path / "plain")
    assert main(["index", str(model_dir), "--corpus", "toy", "--corpus-root", str(tmp_path / "none"),
                 "--out", str(tmp_path / "i"), "--quiet"]) == 2
    assert "clipforge data build toy" in capsys.readouterr().err
    assert main(["index", str(model_dir), "--images", str(tmp_path / "missing"), "--out", str(tmp_path / "i")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("cmd, words", [("index", ["--corpus", "incremental", "--rebuild", "manifest.json"]),
                                        ("serve", ["127.0.0.1", "/search?q=", "--model", "no authentication"])])
def test_help_teaches(cmd, words, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: clipforge {cmd}")
    for w in words:
        assert w in out, w
