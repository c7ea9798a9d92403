"""``clipforge export``: write a model (run, checkpoint or any clipforge.load source) in another format.

--to hf        a transformers CLIPModel/SiglipModel directory (config.json + model.safetensors)
--to onnx      image_encoder.onnx and text_encoder.onnx (normalized embeddings); --quantize int8 stores
               their GEMM weights as int8 (onnxruntime dynamic quantization; inference only)
--to clipforge model_config.json + model.safetensors (e.g. to convert an OpenCLIP/OpenAI/HF checkpoint)
"""
from __future__ import annotations

import argparse

from .common import add_load_arguments, add_overwrite_argument, check_output_dir, load_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a run/checkpoint directory, an HF/OpenCLIP/OpenAI checkpoint, or hf-hub:ORG/NAME")
    p.add_argument("--to", required=True, choices=["hf", "onnx", "clipforge"], help="output format")
    p.add_argument("--out", required=True, help="output directory: new or empty, or an earlier export's with "
                                                "--overwrite")
    add_overwrite_argument(p)
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="with --to onnx: int8 weights by onnxruntime dynamic quantization (about 4x smaller; "
                        "inference only, see docs/performance.md for its speed and accuracy change)")
    add_load_arguments(p)


def run(args) -> int:
    from ..errors import ConfigError
    from ..interop import export_hf, load
    from ..models import save_model

    if args.quantize and args.to != "onnx":
        raise ConfigError(f"--quantize {args.quantize} applies to --to onnx only, not --to {args.to}")
    check_output_dir(args.out, args.overwrite)  # before the model loads: nothing of the user's is replaced
    model, _, _ = load(args.source, **load_options(args))
    if args.to == "hf":
        out = export_hf(model, args.out)
    elif args.to == "onnx":
        from ..interop.onnx_export import export_onnx

        out = export_onnx(model, args.out, quantize=args.quantize)["image"].parent
    else:
        out = save_model(model, args.out)
    what = f"{args.to} ({args.quantize})" if args.quantize else args.to
    print(f"wrote {what} export of '{args.source}' to {out}")
    return 0
