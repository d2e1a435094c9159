"""The package's import graph has no cycle: a reader can learn it bottom up (errors, random -> dropout ->
cells -> kernels -> layers -> lab, ...), and no module needs a deferred import to break a loop.

Two graphs, read from the source with ``ast``: between packages (``droprnn.kernels``, ``droprnn.cells``, ...)
over every import, deferred ones inside functions included; and between modules over the imports made at
import time (a package may defer one of its own modules, as ``kernels/gpu/operator.py`` defers Triton).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SOURCE / "droprnn").rglob("*.py"):
        parts = list(path.relative_to(SOURCE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imported(module: str, node: ast.AST) -> list[str]:
    """The droprnn modules an import statement of ``module`` names (a package when a name is not a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in MODULES]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    whole = [base] if base in MODULES and len(submodules) < len(node.names) else []
    return submodules + whole


def _graph(at_import_time: bool) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body if at_import_time else ast.walk(tree):
            edges[module].update(t for t in _imported(module, node) if t != module)
    return edges


def _package(module: str) -> str:
    """``droprnn.kernels.gpu.lstm`` -> ``droprnn.kernels``; a top-level module is its own package."""
    return ".".join(module.split(".")[:2])


def _cycle(edges: dict[str, set[str]]) -> list[str]:
    """One cycle of ``edges`` (empty when there is none), by depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_graph_reader_sees_the_imports_it_should():
    edges = _graph(at_import_time=True)
    assert "droprnn.dropout.plan" in edges["droprnn.cells"], "from .dropout.plan import StepMasks"
    assert "droprnn.layers.base" in edges["droprnn.layers.dropout"], "from .base import Layer"
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_packages_import_each_other_without_a_cycle():
    packages: dict[str, set[str]] = defaultdict(set)
    for module, targets in _graph(at_import_time=False).items():
        for target in targets:
            # the package's __init__ re-exports the public API: whatever imports it, it is not a layer below
            if target != "droprnn" and _package(module) != _package(target):
                packages[_package(module)].add(_package(target))
    assert _cycle(packages) == [], "a cycle between packages"


def test_modules_import_each_other_without_a_cycle_at_import_time():
    edges = {m: {t for t in targets if t != "droprnn"} for m, targets in _graph(at_import_time=True).items()}
    assert _cycle(edges) == [], "a cycle between modules"
