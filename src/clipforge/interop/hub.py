"""``hf-hub:ORG/NAME`` sources through huggingface_hub, failing fast when offline.

The local cache is tried first (no network). Otherwise a TCP connection to the hub is probed
with a short timeout in a daemon thread (DNS lookups cannot be interrupted otherwise), and
only a reachable hub is asked for files. huggingface_hub downloads into ``.incomplete``
files and renames them when complete, so an interrupted download never leaves a half-written
cache entry. ``HF_HUB_OFFLINE=1`` skips the probe and uses the cache only.
"""
from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.bin", "*.pt"]


def _reachable(host: str, timeout: float) -> bool:
    result = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result)


def download(repo_id: str, timeout: float = 3.0) -> str:
    """Local directory of ``repo_id`` (cached or freshly downloaded), or a clear error at once."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import ENDPOINT
    except ImportError as e:  # pragma: no cover
        raise ImportError("hf-hub: sources need huggingface_hub: pip install huggingface_hub") from e
    try:
        return snapshot_download(repo_id, allow_patterns=PATTERNS, local_files_only=True)
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    host = urlparse(ENDPOINT).hostname or "huggingface.co"
    if offline or not _reachable(host, timeout):
        why = "HF_HUB_OFFLINE is set" if offline else f"{host} cannot be reached (no network)"
        raise ConnectionError(
            f"cannot get 'hf-hub:{repo_id}': it is not in the local Hugging Face cache and {why}. Download it on a "
            f"machine with network (huggingface-cli download {repo_id} --local-dir DIR) and pass that directory "
            "to clipforge.load, or point HF_HOME at a cache that holds it"
        )
    return snapshot_download(repo_id, allow_patterns=PATTERNS)
