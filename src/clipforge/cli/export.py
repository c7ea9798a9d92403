"""``clipforge export``: write a model (run, checkpoint or any clipforge.load source) in another format.

--to hf        a transformers CLIPModel/SiglipModel directory (config.json + model.safetensors)
--to onnx      image_encoder.onnx and text_encoder.onnx (normalized embeddings)
--to clipforge model_config.json + model.safetensors (e.g. to convert an OpenCLIP/OpenAI/HF checkpoint)
"""
from __future__ import annotations

import argparse

from .common import add_load_arguments, load_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a run/checkpoint directory, an HF/OpenCLIP/OpenAI checkpoint, or hf-hub:ORG/NAME")
    p.add_argument("--to", required=True, choices=["hf", "onnx", "clipforge"], help="output format")
    p.add_argument("--out", required=True, help="output directory")
    add_load_arguments(p)


def run(args) -> int:
    from ..interop import export_hf, load
    from ..models import save_model

    model, _, _ = load(args.source, **load_options(args))
    if args.to == "hf":
        out = export_hf(model, args.out)
    elif args.to == "onnx":
        from ..interop.onnx_export import export_onnx

        out = export_onnx(model, args.out)["image"].parent
    else:
        out = save_model(model, args.out)
    print(f"wrote {args.to} export of '{args.source}' to {out}")
    return 0
