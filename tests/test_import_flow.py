"""The house's shape: imports point down the flow (DESIGN.md, "The house").

Every `import` of every module of `cm3leon_jax/` and `tasks/` is read with `ast`:
module-level and lazy (inside functions) alike. A package may import its own modules,
the base-level modules, and packages of a lower level; never a package of its own
level or above. Strict levels also mean the package graph has no cycle.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Lower number = lower in the flow. Keep in step with DESIGN.md ("The house").
LEVELS = {
    "model": 0,
    "train": 1,
    "vocab": 2, "retrieval": 2,
    "data": 3,
    "decode": 4,
    "evaluation": 5, "export": 5,
    # The top: the task registry and the run modes that are modules of their own.
    "tasks": 6, "main": 6, "sft": 6,
    # The demo runs every run mode in turn (sft included), so it sits above them.
    "demo": 7,
    # Run modes and helpers for the tests (cm3leon_jax/testing/__init__.py): they may use
    # any package, and no library module imports them.
    "testing": 8,
}
# The repository's folders that use the library; nothing of it imports them.
OUTSIDE = ("launch", "benchmarks", "tests")
# Anyone may import these; they import no package of the flow.
BASE = {"__init__", "errors", "fs", "hostmem", "images", "xla_flags"}


def package_of_file(path: pathlib.Path) -> str:
    """cm3leon_jax/<pkg>/... or cm3leon_jax/<module>.py or tasks/... -> its package name."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "tasks":
        return "tasks"
    return rel.parts[1] if len(rel.parts) > 2 else rel.stem


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool):
    """(line, absolute module name) of every import in `tree`, however deep."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from cm3leon_jax import data` imports the package `data`.
            for alias in node.names:
                yield node.lineno, (f"{prefix}.{alias.name}" if prefix == "cm3leon_jax"
                                    else prefix)


def target_package(name: str) -> str | None:
    """The flow package an absolute module name belongs to, or None (not ours)."""
    parts = name.split(".")
    if parts[0] == "tasks":
        return "tasks"
    if parts[0] != "cm3leon_jax":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def violations(path: pathlib.Path, source: str) -> list[str]:
    """Every import of `source` (the text of `path`) against the flow, one message each."""
    src = package_of_file(path)
    rel = path.relative_to(ROOT)
    found = []
    for line, name in imported_modules(ast.parse(source), module_name(path),
                                       path.name == "__init__.py"):
        if name.split(".")[0] in OUTSIDE:
            found.append(f"{rel}:{line} imports {name}: the library and tasks/ import nothing "
                         "of launch/, benchmarks/ or tests/ (they use the library, not the "
                         "other way round).")
            continue
        dst = target_package(name)
        if dst is None or dst == src or dst in BASE:
            continue
        where = f"{rel}:{line} imports {name}"
        if src in BASE:
            found.append(f"{where}: base-level module `{src}` may import no package of the "
                         "flow; move what it needs into it or move it up.")
        elif src not in LEVELS or dst not in LEVELS:
            unknown = src if src not in LEVELS else dst
            found.append(f"{where}: package `{unknown}` has no level; add it to LEVELS in "
                         "tests/test_import_flow.py and to DESIGN.md.")
        elif LEVELS[dst] == LEVELS[src]:
            found.append(f"{where}: `{src}` and `{dst}` are one level ({LEVELS[src]}) and "
                         "packages of one level do not import each other; move the shared "
                         "piece down, or have the caller pass it.")
        elif LEVELS[dst] > LEVELS[src]:
            found.append(f"{where}: `{src}` (level {LEVELS[src]}) imports `{dst}` (level "
                         f"{LEVELS[dst]}) against the flow; imports point down. Move the "
                         "piece down, or have the caller pass it in.")
    return found


def python_files() -> list[pathlib.Path]:
    return sorted([*(ROOT / "cm3leon_jax").rglob("*.py"), *(ROOT / "tasks").rglob("*.py")])


def test_imports_follow_the_flow():
    found = [v for path in python_files() for v in violations(path, path.read_text())]
    assert not found, "imports against the flow:\n" + "\n".join(found)


@pytest.mark.parametrize("source,rule", [
    ("def f():\n    from cm3leon_jax.data import shapes\n", "against the flow"),
    ("from cm3leon_jax import evaluation\n", "against the flow"),
    ("from launch import common\n", "import nothing of launch/"),
    ("def f():\n    import benchmarks.decode\n", "import nothing of launch/"),
    ("from ..retrieval import build\n", "one level"),
    ("import cm3leon_jax.launcher\n", "has no level"),
])
def test_the_check_catches_lazy_relative_and_unknown_imports(source, rule):
    path = ROOT / "cm3leon_jax" / "vocab" / "example.py"
    (message,) = violations(path, source)
    assert rule in message and "cm3leon_jax/vocab/example.py" in message
    assert not violations(path, "from cm3leon_jax.model import decoder\nimport cm3leon_jax.fs\n"
                                "from . import layout\n")



def test_every_package_docstring_names_its_modules():
    """A package's docstring is its map (DESIGN.md points to them): a module it does not
    name is one a new reader will not find."""
    package_root = ROOT / "cm3leon_jax"
    missing = []
    for init in sorted(package_root.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        for module in sorted(init.parent.glob("*.py")):
            stem = module.stem
            if stem != "__init__" and not re.search(rf"\b{stem}\b", doc):
                missing.append(f"{init.parent.name}/{module.name}")
    assert not missing, f"not named in their package's docstring: {missing}"
