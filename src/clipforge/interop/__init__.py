"""clipforge.interop: load and export the checkpoints of the CLIP ecosystem; ONNX export.

Depends on the core (``clipforge.models``, tokenizer, transforms), never the reverse.
"""
from .export_hf import export_hf
from .load import FORMATS, load, read_state_dict

__all__ = ["FORMATS", "export_hf", "load", "read_state_dict"]
