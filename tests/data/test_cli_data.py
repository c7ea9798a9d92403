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
