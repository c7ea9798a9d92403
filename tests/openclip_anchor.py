"""One way for every test to find OpenCLIP, which runs in its own virtual environment (the "anchor").

OpenCLIP cannot be installed beside clipforge (it pulls torchvision), so parity tests run it
with the anchor venv's python in a subprocess. The interpreter is ``$CLIPFORGE_OPENCLIP_PYTHON``
when set (``.ci/run`` sets it to what ``../shared/anchors/openclip-venv.sh`` built), else
``<repo>/../.anchor-openclip/bin/python``, the script's default location.

Where the anchor is missing or cannot import open_clip, the tests that need it skip with the
reason, except under ``CI=true``, where they fail: CI builds the anchor, so its absence there
is a broken build, not a reason to skip.
"""
from __future__ import annotations

import os
import subprocess
from functools import cache
from pathlib import Path

import pytest

ENV = "CLIPFORGE_OPENCLIP_PYTHON"
REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO.parent / ".anchor-openclip" / "bin" / "python"
BUILD = "bash ../shared/anchors/openclip-venv.sh"


def anchor_path() -> Path:
    return Path(os.environ[ENV]) if os.environ.get(ENV) else DEFAULT


@cache
def _problem(path: Path) -> str | None:
    if not path.exists():
        return f"the OpenCLIP anchor venv's python '{path}' does not exist"
    try:
        r = subprocess.run([str(path), "-c", "import open_clip"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"'{path}' cannot be run: {e}"
    if r.returncode != 0:
        return f"'{path}' cannot import open_clip: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def openclip_python() -> Path:
    """The anchor's python; skips the calling test where it is unusable (fails instead under CI=true)."""
    path = anchor_path()
    problem = _problem(path)
    if problem is not None:
        msg = f"{problem} (build it with `{BUILD}` and/or set {ENV} to its bin/python)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the OpenCLIP parity reference is missing: {msg}", pytrace=False)
        pytest.skip(msg)
    return path
