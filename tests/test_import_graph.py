"""The package's import graph has no cycle, and no module grows past a readable size.

Imports of the package's own modules sit at the top of their files (the CLI's lazy stage imports
and the benchmark's subprocess entry points excepted), so the graph read from the top level of
every file is the one Python follows. A cycle there either fails at import time or works only in
one import order; this test names it before either happens.

Importing ``autoseg.a.b`` runs the ``__init__`` of ``autoseg.a`` first, unless the importing module
lives inside ``autoseg.a`` (then that package is already being imported): those edges are in the
graph too, since a package that re-exports its submodules closes a cycle through them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import autoseg

PACKAGE_DIR = Path(autoseg.__file__).parent
MAX_LINES = 700


def module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package (packages by their __init__)."""
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def top_level_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Dotted names imported when the module runs: top-level statements, ``try`` and ``if`` bodies
    included, ``if TYPE_CHECKING:`` blocks and function bodies left out."""
    names: set[str] = set()
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # kept below if a module
        elif isinstance(node, ast.If):
            pending.extend(node.orelse if _is_type_checking(node.test) else node.body + node.orelse)
        elif isinstance(node, ast.Try):
            pending.extend(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                pending.extend(handler.body)
    return names


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package that it imports}``, package ``__init__`` runs included."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        own_packages = set(_ancestors(module)) | ({module} if is_package else set())
        edges: set[str] = set()
        for name in top_level_imports(ast.parse(path.read_text(encoding="utf-8"), str(path)), module, is_package):
            if name not in files:
                continue
            for target in [*_ancestors(name), name]:
                if target in files and target not in own_packages and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_package() -> None:
    graph = import_graph()
    assert {"autoseg.labels", "autoseg.inference", "autoseg.inference.model", "autoseg.training"} <= set(graph)
    # a submodule import runs its package's __init__ ...
    assert "autoseg.training" in graph["autoseg.inference.model"]
    # ... but not from inside that package
    assert "autoseg.inference" not in graph["autoseg.inference.model"]


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {module: len(path.read_text(encoding="utf-8").splitlines()) for module, path in module_files().items()}
    too_long = {module: lines for module, lines in sizes.items() if lines > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by job): {too_long}"
