"""The package's imports point one way: the graph of `rlhf_bilevel/` has no cycle.

A cycle hides in an import inside a function as well as at the top of a file, so every
import statement counts, wherever it stands.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "rlhf_bilevel"


def module_name(file: Path, root: Path) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST, package: str, modules: set[str]) -> set[str]:
    """The package's modules an import statement loads: `from a import b` loads `a.b` when that is a module, else `a`."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & modules
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:  # relative: `.` is the importing module's package, `..` its parent
        parent = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*parent, base] if base else parent)
    found = set()
    for alias in node.names:
        found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found & modules


def import_graph(package: Path) -> dict[str, set[str]]:
    root = package.parent
    files = {module_name(file, root): file for file in package.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, file in files.items():
        home = name if file.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        graph[name] = set().union(*(imported(node, home, modules) for node in ast.walk(tree))) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component that has one (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from pkg import c\n")
    (package / "c.py").write_text("from . import a\n")
    (package / "d.py").write_text("from pkg.a import x\n")
    assert cycles(import_graph(package)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "rlhf_bilevel.bilevel" in graph and graph["rlhf_bilevel.train"]
    assert cycles(graph) == []


def test_the_algorithm_knows_nothing_of_processes_or_files():
    """bilevel.py is handed its collectives; it never imports torch.distributed or the run's plumbing."""
    tree = ast.parse((PACKAGE / "bilevel.py").read_text(encoding="utf-8"))
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    forbidden = {"torch.distributed", "rlhf_bilevel.distributed", "rlhf_bilevel.run_folder", "rlhf_bilevel.checkpoint", "transformers"}
    assert not names & forbidden
