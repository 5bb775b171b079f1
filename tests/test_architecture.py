"""The runtime package's import graph: no cycles, the config schema imports no domain module, and nothing in
``agent/`` imports ``training/``. Every import counts: those under ``TYPE_CHECKING`` and inside functions too
(a cycle hidden in a function still ties the two modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parent.parent / "agent"
# What agent/config.py may import of the agent: leaf helpers that import nothing of the agent but errors.
CONFIG_MAY_IMPORT = {"agent.errors", "agent.topics", "agent.template", "agent.payloads", "agent.paths"}


def module_name(path: Path) -> str:
    parts = path.relative_to(AGENT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The modules ``path`` imports (``from agent.x import y`` names agent.x.y when that is a module)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in AGENT.rglob("*.py")}
    known = set(files)
    return {name: {m for m in imports_of(path, known) if m in known and m != name}
            for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
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


def test_cycles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


@pytest.mark.xfail(reason="agent.app <-> agent.voice (from_app) and agent.validate: the wiring module of "
                          "issue 17 (branch issue-17a) removes them; strict, so this marker must go then")
def test_the_runtime_package_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_config_schema_imports_no_domain_module() -> None:
    graph = import_graph()
    assert {m for m in graph["agent.config"] if m.startswith("agent")} <= CONFIG_MAY_IMPORT
    for helper in CONFIG_MAY_IMPORT:
        assert graph[helper] <= {"agent.errors"}, f"{helper} is no leaf: {sorted(graph[helper])}"


def test_the_runtime_never_imports_training() -> None:
    for path in AGENT.rglob("*.py"):
        assert not any(m.split(".")[0] == "training" for m in imports_of(path, set())), path
