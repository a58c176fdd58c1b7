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


# ---- the images' build contexts: what `docker build` is sent and what the Dockerfile copies ----------------

def _dockerignore_patterns(text: str) -> list[tuple[bool, re.Pattern]]:
    """(exclude?, compiled pattern) per line of a .dockerignore: Docker's rules (Go's filepath.Match,
    ``**`` for any number of folders, ``!`` re-includes, the last matching line wins)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        out.append((exclude, re.compile(regex + "$")))
    return out


def sent_to_builder(path: str, ignore: str) -> bool:
    """Whether ``path`` (relative to the build context) is in the context Docker sends, given the
    .dockerignore text: a path is excluded when it or a folder above it matches an excluding line that
    no later ``!`` line re-includes."""
    excluded = False
    parts = path.strip("/").split("/")
    for exclude, regex in _dockerignore_patterns(ignore):
        if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = exclude
    return not excluded


def copy_sources(dockerfile: str) -> list[str]:
    """The sources of the Dockerfile's COPY and ADD instructions from the build context (not those
    --from another stage), continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile)
    out = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from") for w in words[1:]):
            continue
        out += args[:-1]
    return out


def context_problems(dockerfile: Path, ignore: Path, root: Path = REPO) -> list[str]:
    """Why a COPY of ``dockerfile`` would fail with this build context: a source that does not exist, or
    that the .dockerignore keeps from the builder (for a folder: every file in it)."""
    problems = []
    for source in copy_sources(dockerfile.read_text()):
        matches = sorted(root.glob(source.rstrip("/"))) if any(c in source for c in "*?[") else [root / source]
        if not any(m.exists() for m in matches):
            problems.append(f"{source}: does not exist")
            continue
        files = [f for m in matches for f in ([m] if m.is_file() else m.rglob("*")) if f.is_file()]
        if not any(sent_to_builder(str(f.relative_to(root)), ignore.read_text()) for f in files):
            problems.append(f"{source}: left out of the build context by {ignore.name}")
    return problems


def test_the_dockerignore_rules_are_dockers():
    ignore = "*\n!model_code/\n**/__pycache__\n!docs/*.md\n"
    assert sent_to_builder("model_code/model/train.py", ignore)
    assert not sent_to_builder("model_code/model/__pycache__/train.cpython-311.pyc", ignore)
    assert not sent_to_builder("requirements.lock", ignore) and not sent_to_builder("tests/x.py", ignore)
    assert sent_to_builder("docs/serving.md", ignore) and not sent_to_builder("docs/experiments/a.md", ignore)


def test_the_training_images_copies_are_in_its_build_context(tmp_path):
    dockerfile, ignore = REPO / "docker" / "train.Dockerfile", REPO / "docker" / "train.Dockerfile.dockerignore"
    assert copy_sources(dockerfile.read_text()) == ["requirements.lock", "docker/train-requirements.txt",
                                                    "model_code/"]
    assert context_problems(dockerfile, ignore) == []
    # the check catches what broke the build before: the lock left out of the context, a file gone
    old = tmp_path / "old.dockerignore"
    old.write_text(ignore.read_text().replace("!requirements.lock", "!constraints.txt"))
    assert context_problems(dockerfile, old) == ["requirements.lock: left out of the build context by old.dockerignore"]
    gone = tmp_path / "train.Dockerfile"
    gone.write_text(dockerfile.read_text().replace("requirements.lock", "constraints.txt"))
    assert context_problems(gone, ignore) == ["constraints.txt: does not exist"]
    # what it installs is pinned by the lock it copies
    assert re.search(r"pip install -r /tmp/train-requirements.txt -c /tmp/requirements.lock", dockerfile.read_text())


def _builder() -> str | None:
    """docker or podman, where its engine answers."""
    import shutil
    import subprocess

    for tool in ("docker", "podman"):
        if shutil.which(tool) and subprocess.run([tool, "info"], capture_output=True, timeout=30).returncode == 0:
            return tool
    return None


def test_the_training_image_builds_where_a_builder_exists(tmp_path):
    """`docker build -f docker/train.Dockerfile .` (or podman) from the repository; the service's image is
    `bentoml containerize` of a Bento (docs/deployment.md), which needs the same engine."""
    import subprocess

    import pytest

    tool = _builder()
    if tool is None:
        pytest.skip("no container engine answers here (docker info / podman info): the image is not built; "
                    "its build context is checked by test_the_training_images_copies_are_in_its_build_context")
    out = subprocess.run([tool, "build", "-f", "docker/train.Dockerfile", "-t", "circot-train:test", "."],
                         cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = subprocess.run([tool, "run", "--rm", "circot-train:test", "python", "-c",
                          "import model_code.model.recipes, dagster_pipes, torch; print('ok')"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_the_services_image_builds_from_a_bento_where_a_builder_exists(request, tmp_path):
    """`bentoml containerize` of a Bento holding the micro model (the image the deployment's manifests
    name), then the image's Python imports the service."""
    import subprocess

    import pytest

    from assets.bento import build_command
    from tests._serving import prepare

    tool = _builder()
    if tool is None:
        pytest.skip("no container engine answers here (docker info / podman info): the service's image is not "
                    "built; its Bento is built, exported, imported and served in tests/test_service_ops.py")
    env, version, _ = prepare(tmp_path, request.getfixturevalue("micro_base"),
                              request.getfixturevalue("tiny_synthetic"))
    out = subprocess.run(build_command("synthetic", version), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    tag = f"circot:synthetic-{version}"
    out = subprocess.run([sys.executable, "-m", "bentoml", "containerize", tag, "--backend", tool, "-t",
                          f"{tag}-test"], env=env, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = subprocess.run([tool, "run", "--rm", "--entrypoint", "python", f"{tag}-test", "-c",
                          "import bentoml, lancedb, torch, s3fs; print('ok')"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
