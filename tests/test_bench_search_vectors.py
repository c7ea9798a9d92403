"""benchmarks/bench_search.py --vectors and benchmarks/real_text_vectors.py: held-out queries, normalized rows, the
changelog lines."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
from benchhelpers import load_benchmark


def test_given_vectors_hold_out_their_last_rows_as_queries_and_come_back_normalized(tmp_path):
    bench = load_benchmark("bench_search.py")
    rng = np.random.default_rng(0)
    src = rng.standard_normal((50, 8)).astype(np.float32) * 3
    np.save(tmp_path / "v.npy", src)
    x, q = bench.real_vectors(tmp_path / "emb.npy", tmp_path / "v.npy", queries=5)
    assert x.shape == (45, 8) and x.dtype == np.float16 and q.shape == (5, 8)
    unit = src / np.linalg.norm(src, axis=1, keepdims=True)
    np.testing.assert_allclose(x, unit[:45], atol=1e-3)
    np.testing.assert_allclose(q, unit[45:], rtol=1e-6)
    x, _ = bench.real_vectors(tmp_path / "emb2.npy", tmp_path / "v.npy", queries=5, limit=20)
    assert len(x) == 20
    with pytest.raises(SystemExit, match="more than 50 rows"):
        bench.real_vectors(tmp_path / "emb3.npy", tmp_path / "v.npy", queries=50)


def test_changelog_lines_are_distinct_stripped_and_within_the_length_bounds(tmp_path):
    make = load_benchmark("real_text_vectors.py")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "changelog.Debian.gz").write_bytes(gzip.compress(
        b"pkg (1.0-1) unstable; urgency=medium\n\n  * Fix the crash when the config file is empty.\n"
        b"  * short\n -- Someone <x@example.org>  Mon, 01 Jan 2024 00:00:00 +0000\n"))
    (tmp_path / "b" / "changelog.gz").write_bytes(gzip.compress(
        b"    - Fix the crash when the config file is empty.\n" + b"x" * 300 + b"\n"))
    (tmp_path / "b" / "changelog.bad.gz").write_bytes(b"not gzip")
    assert make.changelog_lines(tmp_path) == ["Fix the crash when the config file is empty.",
                                             "pkg (1.0-1) unstable; urgency=medium"]


def test_bf16_embeddings_of_the_script_agree_with_its_fp32_ones_row_by_row(tmp_path, monkeypatch):
    """``--precision bf16`` (autocast around the MiniLM forward) writes every line's vector in its own row, within a
    cosine of 0.999 of the fp32 run's; the summary records the precision."""
    import json
    import sys

    make = load_benchmark("real_text_vectors.py")
    lines = [f"Fix the crash number {i} when the {w} file is empty." for i, w in
             enumerate(["config", "cache", "lock", "log", "state", "socket", "keyring", "manifest"])]
    lines += ["Update the Dutch translation.", "New upstream release with a much longer description of what changed."]
    monkeypatch.setattr(make, "changelog_lines", lambda: sorted(lines))
    out = {}
    for precision in ("fp32", "bf16"):
        path = tmp_path / f"{precision}.npy"
        monkeypatch.setattr(sys, "argv", ["real_text_vectors.py", "--out", str(path), "--precision", precision,
                                          "--batch", "4"])
        make.main()
        out[precision] = np.load(path).astype(np.float32)
        assert json.loads(path.with_suffix(".json").read_text())["precision"] == precision
    a, b = out["fp32"], out["bf16"]
    assert a.shape == (10, 384)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=2e-3)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999 and not np.array_equal(a, b)  # close, but the bf16 run did run in bf16
    # rows stay in the shuffled order whatever the precision: each row is nearest its own fp32 row
    assert ((a @ b.T).argmax(1) == np.arange(10)).all()
