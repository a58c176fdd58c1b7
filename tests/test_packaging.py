"""Packaging: every third-party import is declared in pyproject.toml, requirements.lock pins every
declared dependency and was generated from the current dependency lists, and the ``circot`` console
script is the command line of ``python -m orchestration``."""

import ast
import functools
import subprocess
import sys
import tomllib
from importlib.metadata import EntryPoint, packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tools.lock import (
    DIGEST_PREFIX,
    canonical,
    dependency_digest,
    locked_digest,
    locked_versions,
    parse_pip_config,
    uv_source_args,
)

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
PACKAGES = ("orchestration", "assets", "model_code", "serving")  # what `pip install` installs
# the other folders of Python code and the extras their imports may come from, besides the dependencies
SCRIPTS = {"tests": ("dev",), "tools": ("dev",), "bench": ("bench",)}
OPTIONAL = object()  # an import inside ``try: ... except ImportError``: any extra may provide it


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


def imported_modules(source: str) -> list[tuple[str, bool]]:
    """``(top-level module, optional)`` of each absolute import in ``source``; optional when a
    ``try`` that catches ImportError guards it."""
    found = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name.split(".")[0], guarded) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], guarded))
        elif isinstance(node, ast.Try):
            inner = guarded or any(_catches_import_error(h) for h in node.handlers)
            for child in node.body:
                visit(child, inner)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, guarded)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(ast.parse(source), False)
    return found


@functools.cache
def _installed_modules() -> dict[str, list[str]]:
    return packages_distributions()


def distributions_of(module: str) -> set[str]:
    """The distributions that provide a top-level module (by its own name when none installed does)."""
    return {canonical(d) for d in _installed_modules().get(module, [module])}


def undeclared_imports(root: Path, folders: dict[str, tuple[str, ...]], project: dict) -> list[str]:
    """``path: module (distribution)`` for each third-party import under ``root``/``folders`` that
    the dependencies, or the extras named for its folder, do not declare."""
    def names(requirements) -> set[str]:
        return {canonical(Requirement(r).name) for r in requirements}

    extras = project.get("optional-dependencies", {})
    runtime = names(project.get("dependencies", []))
    any_extra = runtime | names(r for reqs in extras.values() for r in reqs)
    local = {p.stem for p in root.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    missing = []
    for folder, extra_names in folders.items():
        allowed = runtime | names(r for e in extra_names for r in extras.get(e, []))
        for path in sorted((root / folder).rglob("*.py")):
            siblings = {p.stem for p in path.parent.glob("*.py")}
            for module, optional in imported_modules(path.read_text()):
                if module in sys.stdlib_module_names or module in local or module in siblings:
                    continue
                dists = distributions_of(module)
                if not dists & (any_extra if optional else allowed):
                    missing.append(f"{path.relative_to(root)}: {module} ({', '.join(sorted(dists))})")
    return missing


def test_every_third_party_import_is_declared():
    folders = {**{p: () for p in PACKAGES}, **SCRIPTS}
    assert undeclared_imports(REPO, folders, PROJECT) == []
    # the scan sees the imports of the model code, nested ones included
    seen = {m for p in (REPO / "model_code").rglob("*.py") for m, _ in imported_modules(p.read_text())}
    assert {"torch", "transformers", "dagster_pipes", "httpx"} <= seen


def test_an_undeclared_import_is_reported(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text(
        "import os\nimport numpy as np\nfrom pkg import b\nfrom . import c\nimport yaml\n"
        "def f():\n    import torch.nn\n"
        "try:\n    import dagster_k8s\nexcept ImportError:\n    import httpx\n")
    project = {"dependencies": ["numpy>=2", "PyYAML"], "optional-dependencies": {"k8s": ["dagster-k8s"]}}
    # yaml maps to PyYAML, the guarded dagster_k8s to an extra; torch (in a function) and httpx (in
    # the handler, not guarded) are undeclared
    assert undeclared_imports(tmp_path, {"pkg": ()}, project) == ["pkg/a.py: torch (torch)", "pkg/a.py: httpx (httpx)"]
    project["dependencies"] += ["torch", "httpx"]
    assert undeclared_imports(tmp_path, {"pkg": ()}, project) == []


def declared_requirements(project: dict) -> list[Requirement]:
    extras = project.get("optional-dependencies", {}).values()
    return [Requirement(r) for r in [*project.get("dependencies", []), *(r for reqs in extras for r in reqs)]]


def test_the_lock_pins_every_declared_dependency():
    pins = locked_versions()
    wrong = [f"{r} (locked: {pins.get(canonical(r.name))})" for r in declared_requirements(PROJECT)
             if canonical(r.name) not in pins or not r.specifier.contains(pins[canonical(r.name)], prereleases=True)]
    assert wrong == [], "run `make lock`"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_the_lock_is_generated_from_the_current_dependency_lists(tmp_path):
    assert (REPO / "requirements.lock").read_text().startswith(DIGEST_PREFIX)
    assert locked_digest() == dependency_digest(), "pyproject.toml's dependencies changed since the lock: make lock"
    # any change to a dependency list changes the digest
    changed = tmp_path / "pyproject.toml"
    changed.write_text((REPO / "pyproject.toml").read_text().replace('"pytest",', '"pytest>=9",', 1))
    assert dependency_digest(changed) != dependency_digest()


def test_the_lock_resolves_against_the_indexes_pip_uses():
    listing = ("global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'\n"
               "global.find-links='/opt/wheels'\n:env:.find-links='/srv/wheels'\n"
               "global.constraint='/etc/caps.txt'\nglobal.cert='/etc/ssl/ca.crt'\n")
    config = parse_pip_config(listing)
    assert config == {"extra-index-url": ["file:///opt/a/simple", "file:///opt/b/simple"],
                      "find-links": ["/srv/wheels"], "constraint": ["/etc/caps.txt"]}
    assert uv_source_args(config) == ["--extra-index-url", "file:///opt/a/simple", "--extra-index-url",
                                      "file:///opt/b/simple", "--find-links", "/srv/wheels", "--constraint",
                                      "/etc/caps.txt", "--index-strategy", "unsafe-best-match"]
    assert uv_source_args(parse_pip_config(":env:.index-url='https://mirror/simple'\n")) == [
        "--index-url", "https://mirror/simple"]


def test_the_services_requirements_are_pinned_as_in_the_lock():
    pins = locked_versions()
    needed = [line.split("==") for line in (REPO / "serving" / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert needed and [(n, pins.get(canonical(n))) for n, _ in needed] == [(n, v) for n, v in needed]


def test_the_circot_entry_point_is_the_command_line(capsys):
    entry = EntryPoint("circot", PROJECT["scripts"]["circot"], "console_scripts")
    from orchestration.__main__ import main

    assert entry.load() is main
    with pytest.raises(SystemExit) as done:
        entry.load()(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: circot") and all(c in out for c in ("run", "models", "rollback"))


def test_the_installed_commands_answer_help():
    script = Path(sys.executable).parent / "circot"
    if not script.exists():
        pytest.skip(f"this environment has no circot script ({script}): the project is installed without it")
    installed = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    module = subprocess.run([sys.executable, "-m", "orchestration", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert installed.returncode == 0 and installed.stdout.startswith("usage: circot"), installed.stderr
    assert module.returncode == 0 and module.stdout.startswith("usage: python -m orchestration"), module.stderr
    assert installed.stdout.split("\n", 1)[1] == module.stdout.split("\n", 1)[1].replace(
        "python -m orchestration", "circot")
