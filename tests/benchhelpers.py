"""A script of benchmarks/ loaded as a module for its tests (benchmarks/ is a folder of scripts, not a package)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(filename: str, module_name: str | None = None) -> ModuleType:
    """``benchmarks/filename`` executed as module ``module_name`` (default: the file's stem), registered in
    ``sys.modules`` so that dataclasses and pickling inside it find it."""
    name = module_name or Path(filename).stem
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
