"""The package is layered: a module imports only its own package and the layers below it.

``LAYERS`` lists clipforge's top-level modules and packages from the bottom up. An import is
allowed when the imported module is in the importer's own top-level package or in a strictly
lower layer; an import of a higher layer, or of another package in the same layer, fails.
Every import statement counts, at module level or inside a function (a deferred import is
still a dependency), and so does ``importlib.import_module("clipforge...")`` with a literal name.

Decisions the order encodes:
- ``metrics`` sits at the bottom so that ``adapt`` and ``evaluation`` share one implementation
  of each metric without importing each other.
- ``adapt`` is below ``evaluation``: the suite's few-shot task and ``clipforge adapt``'s driver
  (``evaluation/adaptation.py``) use the adapters; ``adapt`` never imports ``evaluation``.
- ``train`` and ``evaluation`` share a layer and import neither each other: the training loop
  receives its evaluation as a callable (``train(cfg, evaluate=...)``), wired up by ``cli``.
  ``captioning`` (programs that produce captions with a trained model) shares their layer.
- ``from clipforge import X`` resolves through the lazy table of ``clipforge/__init__.py``;
  ``clipforge`` itself (``__version__``) belongs to no layer.
"""
import ast
import textwrap
from pathlib import Path

import clipforge

LAYERS: list[tuple[str, ...]] = [
    ("registry", "images", "metrics", "locking", "errors", "allocator"),
    ("tokenizer", "transforms"),
    ("models", "losses", "data"),  # the library core
    ("interop",),
    ("adapt",),
    ("train", "evaluation", "captioning"),
    ("serve",),
    ("cli",),
]

# Upward imports tolerated for now, each as (importing file relative to the package, imported module); empty,
# and it should stay so.
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def _resolve(node: ast.ImportFrom, path: Path, root: Path, package: str) -> str:
    mod = node.module or ""
    if node.level:  # relative: resolve against the file's package
        pkg = path.relative_to(root).parent.parts
        base = list(pkg[: len(pkg) - (node.level - 1)]) if node.level > 1 else list(pkg)
        mod = ".".join([package, *base, *([mod] if mod else [])])
    return mod


def _imports(path: Path, root: Path, package: str, lazy: dict[str, str]):
    """Yield (line, module) for every module ``path`` imports, wherever the statement is."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = _resolve(node, path, root, package)
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                parts = sub.split(".")[1:]
                is_module = root.joinpath(*parts).is_dir() or root.joinpath(*parts[:-1], parts[-1] + ".py").exists()
                if parts and is_module:
                    yield node.lineno, sub  # ``from . import shapes_long``: the submodule itself
                elif mod == package and alias.name in lazy:
                    yield node.lineno, lazy[alias.name]
                else:
                    yield node.lineno, mod
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.lineno, node.args[0].value


def layer_violations(root: Path, package: str, layers: list[tuple[str, ...]],
                     allowed: set[tuple[str, str]] = frozenset(), lazy: dict[str, str] | None = None) -> list[str]:
    """Every import in the package at ``root`` that breaks the layer order, as readable lines."""
    level = {name: i for i, members in enumerate(layers) for name in members}
    problems = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if len(rel.parts) == 1 and rel.name == "__init__.py":
            continue  # the package's own lazy facade
        top = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if top not in level:
            problems.append(f"{rel}: top-level module '{top}' is in no layer; add it to LAYERS")
            continue
        for line, mod in _imports(f, root, package, lazy or {}):
            parts = mod.split(".")
            if parts[0] != package or len(parts) == 1:
                continue
            target = parts[1]
            if target == top or (str(rel), mod) in allowed:
                continue
            if target not in level:
                problems.append(f"{rel}:{line} imports {mod}, which is in no layer")
            elif level[target] > level[top]:
                problems.append(f"{rel}:{line} imports {mod}: '{top}' (layer {level[top]}) may not import the higher "
                                f"layer '{target}' (layer {level[target]})")
            elif level[target] == level[top]:
                problems.append(f"{rel}:{line} imports {mod}: '{top}' and '{target}' share layer {level[top]} and "
                                "may not import each other")
    return problems


def test_every_import_respects_the_layer_order():
    root = Path(clipforge.__file__).parent
    problems = layer_violations(root, "clipforge", LAYERS, ALLOWED_UPWARD, lazy=clipforge._LAZY)
    assert not problems, "\n".join(problems)


def test_allowlisted_upward_imports_still_exist():
    """An allowlist entry whose import is gone must be deleted, so the list only ever shrinks."""
    root = Path(clipforge.__file__).parent
    for rel, mod in ALLOWED_UPWARD:
        path = root / rel
        assert path.exists() and mod in {m for _, m in _imports(path, root, "clipforge", {})}, (
            f"{rel} no longer imports {mod}: delete the entry from ALLOWED_UPWARD")


def test_the_checker_catches_planted_upward_and_sideways_imports(tmp_path):
    """A synthetic package: core < program < cli. Each planted violation is reported, the legal imports are not."""
    pkg = tmp_path / "toy"
    files = {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/base.py": "X = 1\n",
        "core/bad.py": "def f():\n    from ..program import run  # deferred, still upward\n    return run\n",
        "core/bad_absolute.py": "import toy.cli.main\n",
        "core/bad_dynamic.py": "import importlib\nimportlib.import_module('toy.program.run')\n",
        "program/__init__.py": "",
        "program/run.py": "from ..core.base import X\nfrom toy.core import base\nrun = X\n",
        "other/__init__.py": "from ..program import run\n",  # sideways: same layer as program
        "cli/__init__.py": "",
        "cli/main.py": "from ..program.run import run\nfrom .. import core\n",
        "stray.py": "",  # in no layer
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(textwrap.dedent(text))
    layers = [("core",), ("program", "other"), ("cli",)]
    problems = layer_violations(pkg, "toy", layers)
    joined = "\n".join(problems)
    assert any(p.startswith("core/bad.py:2 imports toy.program") and "higher layer 'program'" in p
               for p in problems), joined
    assert any(p.startswith("core/bad_absolute.py:1 imports toy.cli.main") for p in problems), joined
    assert any(p.startswith("core/bad_dynamic.py:2 imports toy.program.run") for p in problems), joined
    assert any(p.startswith("other/__init__.py:1") and "share layer 1" in p for p in problems), joined
    assert any(p.startswith("stray.py") and "in no layer" in p for p in problems), joined
    assert len(problems) == 5, joined  # program/run.py and cli/main.py import only downward
    # the allowlist silences exactly the listed edge
    assert len(layer_violations(pkg, "toy", layers, {("core/bad.py", "toy.program.run")})) == 4


def test_no_module_imports_a_private_name_of_another():
    """``from .x import _name`` reaches into another module's internals: make the name public or move it."""
    root = Path(clipforge.__file__).parent
    offenders = []
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("clipforge")):
                offenders += [f"{f.relative_to(root)}:{node.lineno} imports {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, offenders


# Modules that still print or pass ``print`` around; the trainrel branch converts train/ to logging and the lead
# deletes these entries when it is merged.
PRINTS_ALLOWED: set[str] = set()


def test_only_the_cli_prints():
    """The library reports through ``logging.getLogger(__name__)``; ``print`` (called or passed as a
    callback such as ``log=print``) belongs to ``cli/``, which owns the terminal."""
    root = Path(clipforge.__file__).parent
    offenders = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if rel.parts[0] == "cli" or str(rel) in PRINTS_ALLOWED:
            continue
        offenders += [f"{rel}:{node.lineno}" for node in ast.walk(ast.parse(f.read_text()))
                      if isinstance(node, ast.Name) and node.id == "print"]
    assert not offenders, offenders


def test_no_torchvision_dependency():
    root = Path(clipforge.__file__).parent
    for f in root.rglob("*.py"):
        assert "torchvision" not in {m for _, m in _imports(f, root, "clipforge", {})}, f


def test_test_modules_have_unique_basenames():
    """tests/ has no __init__.py files, so pytest imports each test module by its basename: two files with the
    same name in different folders stop the whole collection ("import file mismatch")."""
    tests = Path(__file__).resolve().parent
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted(tests.rglob("test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(tests)} and {path.relative_to(tests)}")
        seen.setdefault(path.name, path)
    assert not clashes, "test modules share a basename (rename one): " + "; ".join(clashes)
