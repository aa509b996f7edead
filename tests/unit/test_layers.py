"""The package's import graph: acyclic, and the vocabulary and pure parts never import the threaded ones."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"

THREADED = {"memory", "engine", "service", "server", "front", "api", "ops", "asgi"}
"""Modules that own threads or serve requests."""

BELOW_THEM = {"schemas", "reasons", "triggers", "shedding", "config", "budget", "errors", "routes", "breakdown"}
"""Vocabulary and pure logic: what the threaded modules build on, never the other way round."""


def import_graph() -> dict[str, set[str]]:
    modules = {path.stem for path in APP.glob("*.py")}
    graph = {}
    for name in modules:
        deps: set[str] = set()
        for node in ast.walk(ast.parse((APP / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "app":
                deps |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("app."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("app.")}
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                found.append([*path[path.index(dep) :], dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_import_graph_has_no_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_vocabulary_and_pure_logic_import_nothing_threaded() -> None:
    graph = import_graph()
    upward = {name: sorted(graph[name] & THREADED) for name in BELOW_THEM if graph[name] & THREADED}
    assert upward == {}
