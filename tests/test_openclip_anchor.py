"""tests/openclip_anchor.py: a missing OpenCLIP anchor skips the parity tests, except under CI=true, where it fails."""
import openclip_anchor
import pytest


def test_missing_anchor_skips_outside_ci(monkeypatch, tmp_path):
    monkeypatch.setenv(openclip_anchor.ENV, str(tmp_path / "nowhere" / "python"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="nowhere.*openclip-venv.sh"):
        openclip_anchor.openclip_python()


def test_missing_anchor_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.setenv(openclip_anchor.ENV, str(tmp_path / "nowhere" / "python"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true.*nowhere"):
        openclip_anchor.openclip_python()


def test_anchor_that_cannot_import_open_clip_is_unusable(monkeypatch, tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named open_clip' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv(openclip_anchor.ENV, str(fake))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="cannot import open_clip"):
        openclip_anchor.openclip_python()


def test_default_is_beside_the_checkout(monkeypatch):
    monkeypatch.delenv(openclip_anchor.ENV, raising=False)
    assert openclip_anchor.anchor_path() == openclip_anchor.REPO.parent / ".anchor-openclip" / "bin" / "python"
