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
