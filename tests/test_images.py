"""The images' requirement lists cover what their entry points import (nothing is installed: the
imports are read from the source, ast, and mapped to distributions with importlib.metadata)."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

from tests.conftest import REPO
from tools.lock import locked_versions

LOCAL = ("model_code", "serving")


def _module_file(name: str) -> Path | None:
    for path in (REPO / (name.replace(".", "/") + ".py"), REPO / name.replace(".", "/") / "__init__.py"):
        if path.is_file():
            return path
    return None


def third_party_imports(entry: str) -> dict[str, set[str]]:
    """``{top-level module: the project modules importing it}`` over every project module ``entry``
    reaches (its packages' ``__init__`` too), counting imports inside functions as well."""
    found: dict[str, set[str]] = {}
    todo, seen = [entry], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue
        todo += [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]   # its packages
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:   # relative: from the package, node.level - 1 packages up
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top in LOCAL:
                    todo.append(target)
                elif top and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(name)
    return found


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path: Path) -> dict[str, str]:
    return {_normal(n): v for n, v in (line.strip().split("==") for line in path.read_text().splitlines()
                                       if line.strip() and not line.startswith("#"))}


def missing(entry: str, listed: dict[str, str], not_at_run_time: tuple[str, ...] = ()) -> list[str]:
    """The third-party modules ``entry`` imports that no distribution in ``listed`` provides."""
    dists = importlib.metadata.packages_distributions()
    out = []
    for top, importers in sorted(third_party_imports(entry).items()):
        if top in not_at_run_time:
            continue
        names = [_normal(d) for d in dists.get(top, [top])]
        if not any(n in listed for n in names):
            out.append(f"{top} ({'/'.join(names)}), imported by {', '.join(sorted(importers))}")
    return out


def _pins() -> dict[str, str]:
    return {_normal(name): version for name, version in locked_versions().items()}


def test_the_import_walk_finds_what_a_module_imports_lazily_and_through_the_project():
    found = third_party_imports("model_code.model.recipes")
    assert "dagster_pipes" in found and "model_code.model.recipes" in found["dagster_pipes"]   # inside main()
    assert "matplotlib" in found and "accelerate" in found   # through model_code.model.train
    assert not {"os", "json", "model_code", "__future__"} & set(found)


def test_the_training_image_installs_what_the_training_entry_point_imports():
    listed = requirements(REPO / "docker" / "train-requirements.txt")
    assert missing("model_code.model.recipes", listed) == []
    pins = _pins()
    assert all(pins[name] == version for name, version in listed.items()), "pinned as in requirements.lock"
    dockerfile = (REPO / "docker" / "train.Dockerfile").read_text()
    assert "docker/train-requirements.txt" in dockerfile and "COPY model_code/" in dockerfile
    assert "WORKDIR /app" in dockerfile   # where the training pod runs its command (assets/resources.py)


def test_the_training_check_would_catch_a_missing_requirement():
    listed = requirements(REPO / "docker" / "train-requirements.txt")
    listed.pop("dagster-pipes")
    assert [m for m in missing("model_code.model.recipes", listed) if m.startswith("dagster_pipes")]


def test_the_services_requirements_cover_what_the_service_imports():
    listed = requirements(REPO / "serving" / "requirements.txt")
    # model_code.settings checks the pipeline's cron with dagster, in a validator of PipelineSettings only
    assert missing("serving.service", listed, ("dagster",)) == []


def test_the_kubernetes_launcher_names_the_training_image():
    import dagster as dg
    import pytest

    from assets.resources import TrainingResource

    with pytest.raises(dg.Failure, match="docker/train.Dockerfile"):
        TrainingResource(launcher="kubernetes").pod_spec(["python"], "/artifacts")
