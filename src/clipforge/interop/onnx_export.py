"""ONNX export of the image and the text encoder (normalized embeddings), run with onnxruntime.

Each tower is wrapped so the graph takes one input (``pixels`` [B, 3, S, S] float32 or
``input_ids`` [B, L] int64) and returns the L2-normalized embedding [B, embed_dim], with a
dynamic batch axis. The TorchScript-based exporter is used (``dynamo=False``): it needs no
extra package beyond ``onnx``.

``quantize="int8"`` (``clipforge export --to onnx --quantize int8``) then rewrites both graphs with
onnxruntime's dynamic quantization (``quant_pre_process``, then ``quantize_dynamic``): the weights of
every MatMul/Gemm are stored as int8 with one scale per tensor, activations are quantized on the
fly per call, everything else stays float32. The files are a quarter of the size; speed and the
zero-shot accuracy change are measured by benchmarks/bench_onnx.py (docs/performance.md). Every
export writes ``onnx_export.json`` naming its precision; ONNX exports are for inference only, and
``clipforge.load`` (so ``init_from`` too) refuses them with that reason.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models import CLIP

MARKER = "onnx_export.json"
QUANTIZE = ("int8",)


class _ImageEncoder(nn.Module):
    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)


class _TextEncoder(nn.Module):
    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model.encode_text(input_ids)


def export_onnx(model: CLIP, directory: str | Path, opset: int = 17, quantize: str | None = None) -> dict[str, Path]:
    """Write ``image_encoder.onnx`` and ``text_encoder.onnx`` into ``directory`` (int8 weights with
    ``quantize="int8"``, module docstring) and ``onnx_export.json``; returns the two paths."""
    import warnings  # only the export needs it

    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError(f"unknown ONNX quantization '{quantize}'; use one of {list(QUANTIZE)} or none")
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as e:
        raise ImportError("ONNX export needs onnx: pip install 'clipforge[onnx]'") from e
    if quantize:
        try:
            from onnxruntime.quantization import QuantType, quantize_dynamic
            from onnxruntime.quantization.shape_inference import quant_pre_process
        except ImportError as e:
            raise ImportError("int8 quantization needs onnxruntime: pip install 'clipforge[onnx]'") from e
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_onnx(model, tmp, opset)
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            paths = {k: directory / v.name for k, v in fp32.items()}
            for key, path in fp32.items():
                prepared = path.with_suffix(".pre.onnx")  # shapes inferred, graph optimized: what quantization wants
                quant_pre_process(str(path), str(prepared))
                quantize_dynamic(str(prepared), str(paths[key]), weight_type=QuantType.QInt8)
        _write_marker(directory, quantize)
        return paths
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    size, ctx = model.image_size, model.context_length
    paths = {"image": directory / "image_encoder.onnx", "text": directory / "text_encoder.onnx"}
    jobs = [
        (_ImageEncoder(model), torch.zeros(2, 3, size, size), "pixels", paths["image"]),
        (_TextEncoder(model), torch.ones(2, ctx, dtype=torch.long), "input_ids", paths["text"]),
    ]
    # The tracer warns wherever the forward turns a tensor into a Python value (shape checks, the inference-only
    # attention and padding-trim choices, which are fixed for an exported graph anyway), and opset 17 warns that
    # advanced indexing goes wrong for negative indices (the end-of-text gather's are argmax results, never
    # negative). None of them is something the user can act on; test_onnx_parity checks the graphs' outputs
    # against the model, padded captions of real tokenizer output included.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        for module, example, name, path in jobs:
            torch.onnx.export(module, (example,), str(path), input_names=[name], output_names=["embedding"],
                              dynamic_axes={name: {0: "batch"}, "embedding": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
    _write_marker(directory, None)
    return paths


def _write_marker(directory: Path, quantize: str | None) -> None:
    (directory / MARKER).write_text(json.dumps({"format": "onnx", "quantize": quantize,
                                                "files": ["image_encoder.onnx", "text_encoder.onnx"]}, indent=2))


def onnx_export_reason(path: Path) -> str | None:
    """Why ``path`` (a directory or a .onnx file) cannot be loaded as a clipforge model, if it is an ONNX export."""
    directory = path if path.is_dir() else path.parent
    if path.is_file() and path.suffix != ".onnx":
        return None
    if not (directory / MARKER).exists() and not (path.suffix == ".onnx" or (path / "image_encoder.onnx").exists()):
        return None
    quantize = None
    if (directory / MARKER).exists():
        quantize = json.loads((directory / MARKER).read_text()).get("quantize")
    what = f"an {quantize}-quantized ONNX export" if quantize else "an ONNX export"
    return (f"'{path}' is {what}: ONNX graphs are for inference with onnxruntime "
            "(clipforge.interop.onnx_export.OnnxCLIP), not a model clipforge can load or train"
            + (" (its int8 weights cannot be trained)" if quantize else "")
            + "; load, train or init_from the checkpoint it was exported from instead")


class OnnxCLIP:
    """``encode_image`` / ``encode_text`` through onnxruntime sessions of an exported directory."""

    def __init__(self, directory: str | Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        directory = Path(directory)
        self.image = ort.InferenceSession(
            str(directory / "image_encoder.onnx"), opts, providers=["CPUExecutionProvider"]
        )
        self.text = ort.InferenceSession(str(directory / "text_encoder.onnx"), opts, providers=["CPUExecutionProvider"])

    def encode_image(self, pixels: Tensor) -> Tensor:
        return torch.from_numpy(self.image.run(None, {"pixels": pixels.float().numpy()})[0])

    def encode_text(self, ids: Tensor) -> Tensor:
        return torch.from_numpy(self.text.run(None, {"input_ids": ids.long().numpy()})[0])
