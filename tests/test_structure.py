"""The package's shape: no import cycle among ``src/hftlab`` modules, and no file over 400 lines.

Imports are read with ``ast`` from every module, at any depth: an import inside a function
(a lazy import) still couples the two modules, and one that exists only to dodge a cycle at
import time is still a cycle in the design. ``if TYPE_CHECKING:`` imports are left out: they
never run and only name types. A package ``__init__`` that imports all its submodules at run
time to fill a registry (``pkgutil.iter_modules(__path__)``) imports each of them: that is
allowed as long as no cycle results.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "hftlab"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, at any depth (functions, classes, try blocks)."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return found


def imported_modules(name: str, path: Path, known: set[str]) -> dict[str, int]:
    """The hftlab modules that module ``name`` imports, each with the first line doing so.
    ``from hftlab.x import y`` is module ``hftlab.x.y`` when that is a module, else ``hftlab.x``;
    relative imports are resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target in known and target != name:
            edges.setdefault(target, line)
            edges[target] = min(edges[target], line)

    source = path.read_text(encoding="utf-8")
    if path.name == "__init__.py" and _imports_every_submodule(source):
        for target in known:
            if target.rpartition(".")[0] == name:
                add(target, _line_of(source, "import_module"))
    for node in _runtime_imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:
            child = f"{base}.{alias.name}"
            add(child if child in known else base, node.lineno)
    return edges


def _imports_every_submodule(source: str) -> bool:
    return bool(re.search(r"iter_modules\(__path__\)", source)) and "import_module" in source


def _line_of(source: str, text: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if text in line)


def import_graph() -> dict[str, dict[str, int]]:
    found = modules()
    known = set(found)
    return {name: imported_modules(name, path, known) for name, path in found.items()}


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit); components in discovery order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def describe_cycle(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    """The component's modules and every import edge inside it (module:line → module)."""
    members = set(component)
    edges = [f"  {src}:{line} -> {dst}" for src in component
             for dst, line in sorted(graph[src].items()) if dst in members]
    return f"{len(component)} modules: {', '.join(component)}\n" + "\n".join(edges)


def test_strongly_connected_finds_a_cycle() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    components = strongly_connected(graph)
    assert ["a", "b", "c"] in components and ["d"] in components


def test_from_import_of_a_submodule_resolves_to_it(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text("from hftlab.pkg import sub, thing\n"
                    "def f():\n    from hftlab import other\n"
                    "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from hftlab import typed\n")
    known = {"hftlab", "hftlab.pkg", "hftlab.pkg.sub", "hftlab.other", "hftlab.typed"}
    edges = imported_modules("hftlab.m", path, known)
    assert edges == {"hftlab.pkg.sub": 1, "hftlab.pkg": 1, "hftlab.other": 3}


def test_no_import_cycle() -> None:
    graph = import_graph()
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    report = "\n\n".join(describe_cycle(c, graph) for c in cycles)
    assert not cycles, f"import cycles among src/hftlab modules:\n{report}"


def test_no_file_over_400_lines() -> None:
    long = {str(p.relative_to(SRC)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
