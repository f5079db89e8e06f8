"""The package's imports point one way: the graph of `rlhf_bilevel/` has no cycle, and its layers
are `cli → commands → the library`: no library module imports a command, and the cli takes from the
library only what the commands run and the configuration it parses and reports.

A cycle hides in an import inside a function as well as at the top of a file, so every
import statement counts, wherever it stands.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "rlhf_bilevel"
CLI = Path(__file__).parents[1] / "cli" / "app.py"
COMMANDS = "rlhf_bilevel.commands"
CONFIGURATION = {"rlhf_bilevel.config", "rlhf_bilevel.recipe"}  # the recipe the cli parses, and its ConfigError


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
    assert "rlhf_bilevel.bilevel" in graph and graph["rlhf_bilevel.commands.train"]
    assert cycles(graph) == []


def test_the_algorithm_knows_nothing_of_processes_or_files():
    """bilevel.py is handed its collectives; it never imports torch.distributed or the run's plumbing."""
    tree = ast.parse((PACKAGE / "bilevel.py").read_text(encoding="utf-8"))
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    forbidden = {"torch.distributed", "rlhf_bilevel.distributed", "rlhf_bilevel.run_folder", "rlhf_bilevel.checkpoint", "transformers"}
    assert not names & forbidden


def is_command(module: str) -> bool:
    return module == COMMANDS or module.startswith(COMMANDS + ".")


def library_importing_commands(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Each module outside the commands that imports one, with the commands it imports."""
    found = {name: sorted(filter(is_command, imports)) for name, imports in graph.items() if not is_command(name)}
    return {name: commands for name, commands in found.items() if commands}


def cli_strays(source: str) -> list[str]:
    """The cli's imports of the library other than the commands, the configuration, and `…Error`
    and `…Config` types (what it builds from options and reports)."""
    strays = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            strays += [a.name for a in node.names if a.name.startswith("rlhf_bilevel") and not is_command(a.name)]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhf_bilevel"):
            if is_command(node.module) or node.module in CONFIGURATION:
                continue
            strays += [f"{node.module}.{a.name}" for a in node.names if not a.name.endswith(("Error", "Config"))]
    return strays


def test_the_layer_checks_find_an_import_against_the_arrows(tmp_path):
    package = tmp_path / "rlhf_bilevel"
    (package / "commands").mkdir(parents=True)
    for file in ("__init__.py", "commands/__init__.py", "commands/train.py", "bilevel.py"):
        (package / file).write_text("")
    (package / "trainer.py").write_text("def fit():\n    from rlhf_bilevel.commands.train import build\n")
    (package / "commands" / "eval.py").write_text("from rlhf_bilevel.commands.train import build\nfrom rlhf_bilevel import bilevel\n")
    assert library_importing_commands(import_graph(package)) == {"rlhf_bilevel.trainer": ["rlhf_bilevel.commands.train"]}
    source = "from rlhf_bilevel.commands.train import train\nfrom rlhf_bilevel.bilevel import Bilevel, NonFiniteError\nimport rlhf_bilevel.store\n"
    assert cli_strays(source) == ["rlhf_bilevel.bilevel.Bilevel", "rlhf_bilevel.store"]


def test_no_library_module_imports_a_command():
    graph = import_graph(PACKAGE)
    assert "rlhf_bilevel.commands.train" in graph and "rlhf_bilevel.trainer" in graph
    assert library_importing_commands(graph) == {}


def test_the_cli_imports_only_the_commands_and_the_configuration():
    source = CLI.read_text(encoding="utf-8")
    assert "rlhf_bilevel.commands.train" in source
    assert cli_strays(source) == []
