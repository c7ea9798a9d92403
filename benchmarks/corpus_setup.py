"""Make sure a real corpus is built before a benchmark reads it: install the Debian packages its
builder reads (when running as root with apt-get) and build it into the data home, once."""
from __future__ import annotations

import os
import shutil
import subprocess

PACKAGES = {"openclipart": ["openclipart-svg"], "emoji": ["fonts-noto-color-emoji", "unicode-data"]}


def ensure_corpus(name: str, root: str | None = None) -> str:
    """The shard directory of corpus ``name``, built first if it is not there yet."""
    from clipforge.data.corpora import get_builder
    from clipforge.data.shards import corpus_root

    out = corpus_root(name, root)
    if (out / "manifest.json").exists():
        return str(out)
    if shutil.which("apt-get") and os.geteuid() == 0:
        print(f"installing {' '.join(PACKAGES[name])} for the {name} corpus")
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES[name]], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    print(f"building the {name} corpus into {out} (once)")
    get_builder(name)(out)  # a missing package still fails here, naming the apt-get command
    return str(out)
