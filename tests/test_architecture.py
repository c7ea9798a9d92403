"""The library core must not import the programs built on it (train, evaluation, adapt, serve, interop, cli)."""
import ast
from pathlib import Path

import clipforge

CORE = ["models", "losses", "data", "tokenizer.py", "transforms.py", "images.py", "registry.py"]
PROGRAMS = ("train", "evaluation", "cli", "adapt", "serve", "interop")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: resolve against the file's package
                pkg = path.relative_to(Path(clipforge.__file__).parent).parent.parts
                base = list(pkg[: len(pkg) - (node.level - 1)]) if node.level > 1 else list(pkg)
                mod = ".".join(["clipforge", *base, *([mod] if mod else [])])
            yield mod
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name


def test_core_does_not_depend_on_programs():
    root = Path(clipforge.__file__).parent
    offenders = []
    for entry in CORE:
        files = [root / entry] if entry.endswith(".py") else list((root / entry).rglob("*.py"))
        for f in files:
            if not f.exists():
                continue
            for mod in _imports(f):
                if any(mod == f"clipforge.{p}" or mod.startswith(f"clipforge.{p}.") for p in PROGRAMS):
                    offenders.append(f"{f.relative_to(root)} imports {mod}")
    assert not offenders, offenders


def test_no_torchvision_dependency():
    root = Path(clipforge.__file__).parent
    for f in root.rglob("*.py"):
        assert "torchvision" not in set(_imports(f)), f
