"""ONNX export of the image and the text encoder (normalized embeddings), run with onnxruntime.

Each tower is wrapped so the graph takes one input (``pixels`` [B, 3, S, S] float32 or
``input_ids`` [B, L] int64) and returns the L2-normalized embedding [B, embed_dim], with a
dynamic batch axis. The TorchScript-based exporter is used (``dynamo=False``): it needs no
extra package beyond ``onnx``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..models import CLIP


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


def export_onnx(model: CLIP, directory: str | Path, opset: int = 17) -> dict[str, Path]:
    """Write ``image_encoder.onnx`` and ``text_encoder.onnx`` into ``directory``; returns their paths."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as e:
        raise ImportError("ONNX export needs onnx: pip install 'clipforge[interop]'") from e
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    size, ctx = model.image_size, model.context_length
    paths = {"image": directory / "image_encoder.onnx", "text": directory / "text_encoder.onnx"}
    jobs = [
        (_ImageEncoder(model), torch.zeros(2, 3, size, size), "pixels", paths["image"]),
        (_TextEncoder(model), torch.ones(2, ctx, dtype=torch.long), "input_ids", paths["text"]),
    ]
    with torch.no_grad():
        for module, example, name, path in jobs:
            torch.onnx.export(module, (example,), str(path), input_names=[name], output_names=["embedding"],
                              dynamic_axes={name: {0: "batch"}, "embedding": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
    return paths


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
