"""The ``clipforge data`` command group: help, and one-line errors."""
from __future__ import annotations

import pytest

from clipforge.cli.main import main


def test_data_help_lists_actions(capsys):
    with pytest.raises(SystemExit):
        main(["data", "build", "--help"])
    out = capsys.readouterr().out
    assert "openclipart" in out and "emoji" in out and "--limit" in out and "--image-size" in out
    assert main(["data"]) == 0 and "build" in capsys.readouterr().out


def test_info_on_unbuilt_corpus_names_the_build_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIPFORGE_DATA", str(tmp_path))
    assert main(["data", "info", "emoji"]) == 2
    err = capsys.readouterr().err
    assert f"clipforge data build emoji --out {tmp_path / 'emoji'}" in err


def test_build_with_missing_package_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from clipforge.data.corpora import openclipart

    monkeypatch.setattr(openclipart, "SOURCE", str(tmp_path / "missing"))
    assert main(["data", "build", "openclipart", "--out", str(tmp_path / "oc"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "openclipart-svg" in err and "apt-get install -y openclipart-svg" in err


def test_curate_writes_a_curated_shard_set(tmp_path, capsys):
    """``clipforge data curate`` end to end: the written set is what curate_shards writes for the same input."""
    from test_curation import _shard_set

    from clipforge.data.shards import ShardDataset

    _shard_set(tmp_path / "src", [f"a cat {i}" for i in range(12)] + ["a dog"])
    (tmp_path / "entries.txt").write_text("cat\ndog\n")
    rc = main(["data", "curate", str(tmp_path / "src"), "--entries", str(tmp_path / "entries.txt"), "--t", "3",
               "--out", str(tmp_path / "out"), "--seed", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    kept = len(ShardDataset(tmp_path / "out"))
    assert f"13 train samples, 13 matched an entry, {kept} kept at t=3" in out
    assert 1 < kept < 13 and ShardDataset(tmp_path / "out")[kept - 1]["captions"] == ["a dog"]


@pytest.mark.parametrize("argv, words", [
    (["--entries", "MISSING", "--t", "3"], ["entries file", "does not exist", "builtin"]),
    (["--entries", "builtin", "--t", "0"], ["--t must be positive"]),
    (["--entries", "builtin", "--t", "5", "--src-empty"], ["has no train samples"]),
])
def test_curate_bad_input_is_one_clear_line(tmp_path, capsys, argv, words):
    from test_curation import _shard_set

    empty = "--src-empty" in argv
    argv = [a for a in argv if a != "--src-empty"]
    _shard_set(tmp_path / "src", [] if empty else ["a cat"])
    argv = [str(tmp_path / "MISSING") if a == "MISSING" else a for a in argv]
    assert main(["data", "curate", str(tmp_path / "src"), *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and all(w in err for w in words), err
