"""The library's layering: no import cycle between its packages, and generic code never imports a
benchmark's own package (it asks ``model_code.datasets.hooks``)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("model_code", "assets", "serving", "orchestration")


def _unit(module: str) -> str:
    """The package a module belongs to: ``model_code.<sub>`` for the library, else the top package
    (``model_code.chain`` and other top-level library modules are units of their own)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "model_code" else parts[0]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in TOP}


def _graph() -> dict[str, dict[str, list[str]]]:
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for top in TOP:
        for path in (ROOT / top).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for target in _imports(path):
                a, b = _unit(module), _unit(target)
                if a != b:
                    edges[a][b].append(str(path.relative_to(ROOT)))
    return edges


def _cycle(edges) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in edges.get(node, {}):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in list(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_packages():
    edges = _graph()
    cycle = _cycle(edges)
    where = [f"{a} -> {b}: {edges[a][b]}" for a, b in zip(cycle, cycle[1:])] if cycle else []
    assert cycle is None, "import cycle:\n" + "\n".join(where)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b": []}, "b": {}}) is None


def test_generic_code_does_not_import_a_benchmark_package():
    offenders = [f"{src} imports model_code.synthetic"
                 for src, targets in _graph().items()
                 if src != "model_code.synthetic" and "model_code.synthetic" in targets]
    assert not offenders, offenders
