"""The layers point one way: jacobian_store ← solvers ← study, and no file imports itself back.

Every import of every module is read with ``ast`` (function-level imports included, since they
run too) and resolved to a module of this repository. bin/, benchmarks/ and tests/ may import
anything; they are not walked.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("jacobian_store", "solvers", "study")  # bottom to top


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every import in the source of module ``name`` that names a module of this
    repository. ``from pkg import x`` counts as importing pkg.x when that is a module, else pkg."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # import a.b.c of a module a.b: the module a.b
                target = target.rpartition(".")[0]
            if target:
                found.append((node.lineno, target))
    return found


GRAPH = {name: _imports(name, path.read_text(), path.name == "__init__.py") for name, path in MODULES.items()}


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_the_walk_sees_the_packages():
    assert {"jacobian_store.gram", "solvers.api", "study.spectrum", "study.experiments.runner"} <= set(MODULES)
    assert "jacobian_store.layer_jacobians" in [t for _, t in GRAPH["jacobian_store.gram"]]


def test_no_upward_import():
    upward = [f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}"
              for name, edges in GRAPH.items() for line, target in edges if _layer(target) > _layer(name)]
    assert not upward, "imports against the layers (jacobian_store ← solvers ← study):\n" + "\n".join(upward)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module, among modules of the same package
    (Tarjan's algorithm); a package's __init__ counts as a member of its own package."""
    def package(module):
        return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]

    edges = {name: sorted({t for _, t in GRAPH[name] if t != name and package(t) == package(name)})
             for name in MODULES}
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return components


def test_no_import_cycle_within_a_package():
    cycles = _cycles()
    assert not cycles, "files that import each other (directly or through others):\n" + "\n".join(
        " ↔ ".join(c) for c in cycles)


@pytest.mark.parametrize("name,source,expected", [
    ("solvers.x", "from jacobian_store.sizes import parse_bytes", ["jacobian_store.sizes"]),
    ("solvers.x", "from jacobian_store import provenance", ["jacobian_store.provenance"]),
    ("solvers.x", "import jacobian_store.gram as g", ["jacobian_store.gram"]),
    ("solvers.x", "from .rank import rank_cutoff", ["solvers.rank"]),
    ("study.experiments.x", "from ..spectrum import main", ["study.spectrum"]),
    ("study.experiments.x", "from . import runner", ["study.experiments.runner"]),
    ("solvers.x", "def f():\n    from study.metrics import accuracy", ["study.metrics"]),
    ("solvers.x", "import numpy", []),
])
def test_imports_are_resolved(name, source, expected):
    assert [target for _, target in _imports(name, source)] == expected
