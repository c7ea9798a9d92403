"""Two processes meeting on one index: a lock, unique temporary files, readers that see old or new, never half."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.serve import open_index
from clipforge.serve.index import COLUMNS, FORMAT, _write

# Runs `clipforge index ARGS` once a go-file appears, each image load slowed by 50 ms so that two runs started
# together overlap for seconds (the window in which the unlocked code lost one run's images).
RUNNER = r"""
import os, sys, time
ready, go = sys.argv[1], sys.argv[2]
import clipforge.images as images
from clipforge.cli.main import main
real = images.load_image
def slow(*a, **k):
    time.sleep(0.05)
    return real(*a, **k)
images.load_image = slow
open(ready, "w").close()
deadline = time.time() + 120
while not os.path.exists(go) and time.time() < deadline:
    time.sleep(0.01)
sys.exit(main(sys.argv[3:]))
"""


def _folder(root: Path, n: int, seed: int) -> Path:
    from clipforge.data.shapes import ShapesGenerator

    root.mkdir(parents=True)
    gen = ShapesGenerator("val", seed=seed, image_size=48)
    for i in range(n):
        Image.fromarray(gen.sample(i).image).save(root / f"img{i:03d}.png")
    return root


def _two_runs(tmp_path, model_dir, extra: list[str]) -> tuple[list[subprocess.CompletedProcess], Path, Path, Path]:
    a, b = _folder(tmp_path / "a", 40, seed=1), _folder(tmp_path / "b", 40, seed=2)
    out = tmp_path / "idx"
    go = tmp_path / "go"
    procs = []
    for name, folder in (("a", a), ("b", b)):
        args = ["index", str(model_dir), "--images", str(folder), "--out", str(out), "--quiet", *extra]
        procs.append(subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path / f"ready-{name}"), str(go), *args],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{n}").exists() for n in "ab"):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()  # both start indexing together
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done, a, b, out


def _keys_under(index: Path, folder: Path) -> set[str]:
    prefix = folder.resolve().as_posix() + "/"
    return {k for k in open_index(index).meta["key"] if k.startswith(prefix)}


def test_second_concurrent_index_run_fails_clearly_and_nothing_is_lost(model_dir, tmp_path):
    (ra, rb), a, b, out = _two_runs(tmp_path, model_dir, [])
    codes = sorted([ra.returncode, rb.returncode])
    assert codes == [0, 2], (ra.stdout, ra.stderr, rb.stdout, rb.stderr)
    winner, loser = (ra, rb) if ra.returncode == 0 else (rb, ra)
    won_folder = a if winner is ra else b
    assert "40 added" in winner.stdout
    err = loser.stderr
    assert "is in use by pid" in err and "--wait" in err and "Traceback" not in err and loser.stdout == ""
    assert len(_keys_under(out, won_folder)) == 40 and len(open_index(out)) == 40


def test_concurrent_index_runs_with_wait_both_land(model_dir, tmp_path):
    (ra, rb), a, b, out = _two_runs(tmp_path, model_dir, ["--wait", "120"])
    assert ra.returncode == 0 and rb.returncode == 0, (ra.stderr, rb.stderr)
    assert "40 added" in ra.stdout and "40 added" in rb.stdout
    assert len(_keys_under(out, a)) == 40 and len(_keys_under(out, b)) == 40 and len(open_index(out)) == 80
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind


def _state(tag: int, n: int = 50, dim: int = 8):
    emb = np.full((n, dim), tag, dtype=np.float16)
    meta = {c: [] for c in COLUMNS}
    for i in range(n):
        for c, v in zip(COLUMNS, (f"k{i}", "file", f"/x/{i}.png", -1, 1, 1, "png", f"state {tag}", None), strict=True):
            meta[c].append(v)
    manifest = {"format": FORMAT, "model": {"weights_sha256": "0" * 64}, "dim": dim, "dtype": "float16",
                "normalized": True, "sources": []}
    return manifest, emb, meta


def test_concurrent_writes_use_unique_temporary_files(tmp_path):
    """Two writers at once (no lock at this level) both complete, and every file of the index is one writer's,
    whole. Which writer's file lands last can differ between the files: only the index lock, which build_index
    holds, makes the index as a whole one writer's (_write's docstring;
    test_concurrent_index_runs_with_wait_both_land)."""
    root = tmp_path / "idx"
    _write(root, *_state(0))
    errors = []

    def writer(tag):
        try:
            for _ in range(15):
                _write(root, *_state(tag))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(t,)) for t in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    data = open_index(root)
    assert {int(v) for v in data.embeddings[:, 0]} in ({1}, {2})  # one writer's embeddings, whole
    assert set(data.meta["caption"]) in ({"state 1"}, {"state 2"})  # one writer's metadata, whole
    assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]


def test_readers_see_the_old_or_the_new_index_never_half(tmp_path):
    """A reader opening the index while it is rewritten (same row count, other contents) gets one whole state.

    The writer holds the index lock as build_index does and rewrites every few milliseconds."""
    from clipforge.locking import exclusive_lock

    root = tmp_path / "idx"
    _write(root, *_state(1))
    stop = threading.Event()

    def writer():
        tag = 1
        with exclusive_lock(root, what="index"):
            while not stop.is_set():
                tag = 3 - tag
                _write(root, *_state(tag))
                time.sleep(0.005)

    t = threading.Thread(target=writer)
    t.start()
    problems = []
    try:
        for _ in range(100):
            try:
                data = open_index(root)
            except Exception as e:  # noqa: BLE001 - a reader must never fail mid-write
                problems.append(repr(e))
                continue
            tags = sorted(np.unique(data.embeddings).tolist())
            captions = sorted(set(data.meta["caption"]))
            if len(tags) != 1 or captions != [f"state {int(tags[0])}"]:
                problems.append((tags, captions))
    finally:
        stop.set()
        t.join(60)
    assert problems == []


def test_stale_temporary_files_of_a_killed_run_are_cleaned_up(model_dir, image_dir, tmp_path):
    from clipforge.cli.main import main

    out = tmp_path / "idx"
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(out), "--quiet"]) == 0
    stale = out / ".embeddings.npy.12345.tmp"
    stale.write_bytes(b"half a file")
    (out / "embeddings.npy.tmp").mkdir()  # the old fixed name, as a directory: writing to it would crash
    assert main(["index", str(model_dir), "--images", str(image_dir), "--out", str(out), "--quiet",
                 "--rebuild"]) == 0
    assert len(open_index(out)) == 10 and not stale.exists()
    assert os.path.isdir(out / "embeddings.npy.tmp")  # not ours to remove: only our own name pattern is cleaned


def test_index_files_keep_the_usual_permissions(tmp_path):
    """Unique temporary files must not make the index private (mkstemp's 0600): other users may serve it."""
    root = tmp_path / "idx"
    old = os.umask(0o022)
    try:
        _write(root, *_state(1))
    finally:
        os.umask(old)
    for name in ("embeddings.npy", "metadata.parquet", "manifest.json"):
        assert (root / name).stat().st_mode & 0o777 == 0o644, name
