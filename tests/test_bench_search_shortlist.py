"""benchmarks/bench_search_shortlist.py: the IVF-PQ sweep separates lists not probed from candidates cut by the
shortlist."""
from __future__ import annotations

import numpy as np
import pytest
from benchhelpers import load_benchmark

pytest.importorskip("faiss")


def test_probing_every_list_with_a_shortlist_of_everything_is_exact_search(tmp_path, capsys):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 16))
    x = centers[rng.integers(0, 20, 3050)] + 0.8 * rng.standard_normal((3050, 16))
    np.save(tmp_path / "v.npy", x.astype(np.float32))
    bench = load_benchmark("bench_search_shortlist.py")
    rows = bench.main(["--vectors", str(tmp_path / "v.npy"), "--queries", "50", "--max-memory", "10MB",
                       "--nlists", "16", "--nprobes", "1", "16", "--shortlists", "10", "3000", "--tmp", str(tmp_path)])
    got = {(r["nprobe"], r["shortlist"]): r for r in rows}
    assert set(got) == {(1, 10), (1, 3000), (16, 10), (16, 3000)}
    # every list probed: the IVF-Flat bound is exact search, and so is a shortlist holding every vector
    assert got[16, 3000]["flat_recall"] == 1.0 and got[16, 3000]["recall"] == 1.0
    assert got[16, 3000]["tuning_recall"] == 1.0
    # one list of sixteen: the exact re-scoring of everything probed reaches the IVF-Flat bound, and no further
    assert got[1, 3000]["recall"] == pytest.approx(got[1, 3000]["flat_recall"]) and got[1, 3000]["recall"] < 1.0
    # a shortlist of 10 for k = 10 cuts candidates the quantized scores misplace (max(10, 4(k + 1)) = 44 asked)
    assert got[16, 10]["recall"] < 1.0
    assert "| lists | build s | nprobe | shortlist |" in capsys.readouterr().out
