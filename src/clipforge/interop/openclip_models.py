"""OpenCLIP's model names and the architecture details their weights cannot show.

Weights show widths, depths, patch and image size, context length and vocabulary, but not the
activation (GELU or OpenAI's QuickGELU), the number of attention heads, or options such as
pooling and norm placement. OpenCLIP keeps those in one JSON file per model name
(``open_clip/model_configs/NAME.json``). ``openclip_models.json``, shipped beside this module,
is those files as data: for each name either the OpenCLIP model config (``model_cfg``) or why
clipforge cannot read that model (``unsupported``: the options of :func:`unsupported_options`
that its image or text tower does not reproduce: timm or Hugging Face towers, SigLIP's, the
ModifiedResNet of the RN50 family, CoCa, ...). Its ``source`` field names the open_clip
version it was built from; :func:`build_table` rebuilds it from an OpenCLIP install and
``tests/interop/test_openclip_models.py`` checks the shipped file against OpenCLIP's own.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from .openclip_layout import unsupported_options

TABLE = Path(__file__).with_name("openclip_models.json")


@lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    return json.loads(TABLE.read_text())


def names(supported_only: bool = True) -> list[str]:
    models = table()["models"]
    return sorted(n for n, e in models.items() if not supported_only or "model_cfg" in e)


def model_config(name: str) -> dict[str, Any]:
    """OpenCLIP's model config for ``name``; a clear error for unknown names and models clipforge cannot read."""
    models = table()["models"]
    entry = models.get(name)
    if entry is None:
        close = [n for n in names() if n.lower().startswith(name.lower().split("-quickgelu")[0][:5])][:8]
        raise ValueError(f"'{name}' is not an OpenCLIP model name clipforge knows ({table()['source']}). "
                         f"Readable names include {close or names()[:8]}; the full list: "
                         "clipforge.interop.openclip_models.names()")
    if "model_cfg" not in entry:
        hint = ("; SigLIP checkpoints load as Hugging Face SiglipModel directories (config.json + model.safetensors)"
                if "siglip" in name.lower() else "")
        raise ValueError(f"OpenCLIP model '{name}' is not supported by clipforge: {entry['unsupported']}{hint}")
    return json.loads(json.dumps(entry["model_cfg"]))  # a copy


def build_table(config_dir: str | Path, version: str) -> dict[str, Any]:
    """The table from OpenCLIP's ``model_configs`` directory (``open_clip`` ``version``), as shipped."""
    models: dict[str, Any] = {}
    for path in sorted(Path(config_dir).glob("*.json")):
        cfg = json.loads(path.read_text())
        bad = unsupported_options(cfg)
        models[path.stem] = ({"unsupported": "its config uses " + ", ".join(bad) + ", which clipforge's ViT image "
                                             "tower and text transformer do not reproduce"}
                             if bad else {"model_cfg": cfg})
    return {"source": f"open_clip {version} (open-clip-torch), open_clip/model_configs/*.json", "models": models}


if __name__ == "__main__":  # python -m clipforge.interop.openclip_models CONFIG_DIR VERSION > openclip_models.json
    import sys

    sys.stdout.write(json.dumps(build_table(sys.argv[1], sys.argv[2]), indent=1, sort_keys=True) + "\n")
