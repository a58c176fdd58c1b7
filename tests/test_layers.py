"""The library's layering: no import cycle between its packages, generic code never imports a
benchmark's own package (it asks the benchmark's spec for its hooks), no code outside the benchmark
modules branches on a benchmark's name, and imports sit at the module top
unless importing them is slow."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("model_code", "assets", "serving", "orchestration")

# Libraries slow enough to import that they are imported inside the functions that use them (the CLI,
# the Dagster definitions and the tests load most modules). matplotlib (pyplot ~0.33 s on top of the
# Dagster definitions) is measured slow; pandas and pyarrow are not on the list: the definitions load
# pandas (and so pyarrow) anyway, and pyarrow.parquet adds ~10 ms to them. dagster (about 1 s): the
# command line imports it only for the commands that run something, so that `circot --help` answers
# at once; dagster_k8s is an optional extra (the Kubernetes launcher), imported only when used.
# prometheus_client is not slow but must be imported after BentoML has set up its multiprocess
# metrics directory in the worker (the service's metrics), so it is imported where used too. kubernetes
# (its client, ~0.4 s) and kubernetes_validate (~0.1 s): only deployment[d] uses them.
SLOW = frozenset({"torch", "torchvision", "transformers", "peft", "accelerate", "great_expectations", "lancedb",
                  "bentoml", "matplotlib", "dagster", "dagster_k8s", "prometheus_client", "kubernetes",
                  "kubernetes_validate"})

# Modules (paths from the project root) that may still import inside functions what could be imported
# at the top: none now; the list can only shrink (a module that became clean fails the test until it
# leaves the list).
NOT_YET_CLEAN: frozenset[str] = frozenset()


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


# ---------------------------------------------------------------------------------------------
# no branch on a benchmark's name outside the benchmark modules

# Where a benchmark's name may be compared with: its spec, its own module, its own package.
BENCHMARK_MODULES = ("model_code/benchmarks.py", "model_code/data/readers/", "model_code/synthetic/")


def name_branches(root: Path, tops, benchmark_names, allowed=BENCHMARK_MODULES) -> list[str]:
    """``["path:line: code"]`` of every comparison with a benchmark's name (``==``, ``!=``, ``in`` a
    literal of names), ``match`` case on one, and dict literal keyed by one, outside ``allowed``:
    generic code receives the benchmark's spec and reads its fields instead."""

    def is_name(node) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in benchmark_names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(is_name(e) for e in node.elts)
        return False

    found = []
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel.startswith(allowed):
                continue
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                hit = (isinstance(node, ast.Compare) and any(is_name(n) for n in [node.left, *node.comparators])) \
                    or (isinstance(node, ast.MatchValue) and is_name(node.value)) \
                    or (isinstance(node, ast.Dict) and any(k is not None and is_name(k) for k in node.keys))
                if hit:
                    found.append((rel, node.lineno, ast.unparse(node)))
    return [f"{rel}:{line}: {code}" for rel, line, code in sorted(found)]


def test_generic_code_never_branches_on_a_benchmark_name():
    from model_code.benchmarks import BENCHMARKS

    found = name_branches(ROOT, TOP, set(BENCHMARKS))
    assert not found, "a benchmark's name compared with outside the benchmark modules (read its spec):\n" + \
        "\n".join(found)


def test_name_branch_finder_finds_each_kind(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "ok.py").write_text("DEFAULT = 'cirr'\nf(dataset='cirr')\nif spec.categories: pass\n")
    (tmp_path / "pkg" / "bad.py").write_text(
        "if dataset == 'cirr': pass\n"
        "x = 1 if name in ('circo', 'x') else 2\n"
        "match name:\n    case 'cirr':\n        pass\n"
        "d = {'circo': ('annotations',)}\n")
    assert [line.split(": ")[0] for line in name_branches(tmp_path, ["pkg"], {"cirr", "circo"}, ())] == [
        "pkg/bad.py:1", "pkg/bad.py:2", "pkg/bad.py:4", "pkg/bad.py:6"]


# ---------------------------------------------------------------------------------------------
# imports at the module top unless slow


def _modules(root: Path, tops) -> dict[str, tuple[Path, ast.Module]]:
    """``{dotted module name: (path, syntax tree)}`` of every module under the packages ``tops``."""
    out = {}
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            out[name] = (path, ast.parse(path.read_text(), str(path)))
    return out


def _split_imports(tree: ast.Module) -> tuple[list, list]:
    """(imports run when the module is imported, imports inside functions). Class bodies run at import
    time; ``if TYPE_CHECKING:`` blocks never run."""
    top, inside = [], []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for branch in child.orelse:
                    visit_one(branch, in_function)
                continue
            visit_one(child, in_function)

    def visit_one(node, in_function):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            (inside if in_function else top).append(node)
        visit(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return top, inside


def _targets(node, module: str, is_package: bool, known) -> tuple[set[str], set[str]]:
    """(top-level names of the libraries an import statement imports, the known modules it runs:
    every package on the way and, for ``from p import m``, the module ``p.m``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".")[: len(module.split(".")) - node.level + is_package]
            base = ".".join(parts + ([base] if base else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    libraries, modules = set(), set()
    for name in names:
        parts = name.split(".")
        libraries.add(parts[0])
        modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known)
    return libraries, modules


def lazy_import_offenders(root: Path, tops, slow=SLOW) -> dict[str, list[str]]:
    """``{path: ["path:line: import ..."]}``: the imports inside functions that are neither of a slow
    library nor of a module that imports one at its top (itself or through the modules it imports)."""
    modules = _modules(root, tops)
    split = {name: _split_imports(tree) for name, (_, tree) in modules.items()}

    def targets(name, node):
        return _targets(node, name, modules[name][0].name == "__init__.py", modules)

    top_targets = {name: [targets(name, node) for node in top] for name, (top, _) in split.items()}
    heavy: set[str] = set()
    grown = True
    while grown:   # the modules that import a slow library at their top, directly or through others
        grown = False
        for name, found in top_targets.items():
            if name not in heavy and any(libs & slow or mods & heavy for libs, mods in found):
                heavy.add(name)
                grown = True
    offenders: dict[str, list[str]] = defaultdict(list)
    for name, (_, inside) in split.items():
        path = modules[name][0].relative_to(root).as_posix()
        for node in inside:
            libs, mods = targets(name, node)
            if not (libs & slow or mods & heavy):
                offenders[path].append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return dict(offenders)


def test_imports_are_at_the_module_top_unless_slow():
    offenders = lazy_import_offenders(ROOT, TOP)
    new = [line for path, lines in sorted(offenders.items()) if path not in NOT_YET_CLEAN for line in lines]
    assert not new, ("imports inside functions that belong at the module top (only slow libraries, and modules "
                     "that import one at their top, are imported where used):\n" + "\n".join(new))
    clean = sorted(path for path in NOT_YET_CLEAN if path not in offenders)
    assert not clean, f"clean now: remove from NOT_YET_CLEAN in {__file__}: {clean}"


def test_lazy_import_checker_finds_an_offender(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "light.py").write_text("import json\n")
    (pkg / "net.py").write_text("import torch.nn\n")                       # slow at its top
    (pkg / "sub" / "model.py").write_text("from .. import net\n")          # slow through net
    (pkg / "sub" / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n")
    (pkg / "use.py").write_text(
        "import os\n"
        "class A:\n"
        "    def f(self):\n"
        "        import torch\n"                      # slow library: allowed
        "        from pkg.sub.model import X\n"       # module slow to import, transitively: allowed
        "        from pkg.sub import model\n"         # the same, named as a package member: allowed
        "def g():\n"
        "    import json\n"                           # standard library: offender
        "    from pkg import light\n"                 # light project module: offender
        "    from pkg.sub.typed import Y\n"           # imports torch only for type checking: offender
        "    def inner():\n"
        "        from . import light as again\n"      # nested function, relative import: offender
    )
    assert lazy_import_offenders(tmp_path, ["pkg"]) == {"pkg/use.py": [
        "pkg/use.py:8: import json",
        "pkg/use.py:9: from pkg import light",
        "pkg/use.py:10: from pkg.sub.typed import Y",
        "pkg/use.py:12: from . import light as again",
    ]}
