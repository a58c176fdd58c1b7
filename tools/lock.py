"""requirements.lock: the exact versions of the project's whole environment, generated from the
dependencies pyproject.toml declares (all its extras included) by ``uv pip compile``.

    make lock                      # tools/lock.py compile: keep the locked versions that still fit pyproject.toml
    make lock LOCK_ARGS=--upgrade  # re-resolve every package to the newest version pyproject.toml allows
    make lock LOCK_ARGS='-P transformers'   # upgrade one package
    make install                   # tools/lock.py install -e '.[dev]': uv pip install -c requirements.lock ...

uv resolves and installs against the package indexes pip is configured with on this machine (``pip config list``:
index-url, extra-index-url, find-links and constraint files), choosing among them as pip does, so the
lock holds versions ``pip install`` can fetch here. The lock's first line records a digest of
pyproject.toml's dependency lists; tests/test_packaging.py fails when they changed after the lock
was generated.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
DIGEST_PREFIX = "# pyproject-dependencies-sha256: "
PYTHON_VERSION = "3.11"  # the oldest Python pyproject.toml accepts (requires-python)


def dependency_lists(pyproject: Path = PYPROJECT) -> dict:
    """What the lock is generated from: requires-python, dependencies and every extra."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return {"requires-python": project.get("requires-python"),
            "dependencies": project.get("dependencies", []),
            "optional-dependencies": project.get("optional-dependencies", {})}


def dependency_digest(pyproject: Path = PYPROJECT) -> str:
    return hashlib.sha256(json.dumps(dependency_lists(pyproject), sort_keys=True).encode()).hexdigest()


def locked_digest(lock: Path = LOCK) -> str | None:
    """The digest recorded in the lock's header, None when it has none."""
    for line in lock.read_text().splitlines():
        if line.startswith(DIGEST_PREFIX):
            return line[len(DIGEST_PREFIX):].strip()
    return None


def canonical(name: str) -> str:
    """A distribution's name as package indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path = LOCK) -> dict[str, str]:
    """``{canonical name: version}`` of every package the lock pins."""
    pins = {}
    for line in lock.read_text().splitlines():
        requirement = line.split("#", 1)[0].split(";", 1)[0].strip()
        if "==" in requirement:
            name, version = requirement.split("==", 1)
            pins[canonical(name.strip())] = version.strip()
    return pins


def parse_pip_config(listing: str) -> dict[str, list[str]]:
    """The package sources in the output of ``pip config list`` (lines ``section.key='value'``), as
    pip applies them to ``pip install``: the environment (``:env:``) over the ``install`` section
    over the ``global`` one."""
    rank = {"global": 0, "install": 1, ":env:": 2}
    found: dict[str, tuple[int, list[str]]] = {}
    for line in listing.splitlines():
        name, sep, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if not sep or section not in rank or key not in ("index-url", "extra-index-url", "find-links", "constraint"):
            continue
        if key not in found or rank[section] >= found[key][0]:
            found[key] = (rank[section], value.strip().strip("'\"").split())
    return {key: values for key, (_, values) in found.items()}


def uv_source_args(config: dict[str, list[str]]) -> list[str]:
    """uv's options for the sources pip uses; with more than one source, uv picks the best version
    across all of them as pip does (``--index-strategy unsafe-best-match``) instead of taking every
    version of a package from the first index that has it."""
    args = []
    for url in config.get("index-url", [])[:1]:
        args += ["--index-url", url]
    for url in config.get("extra-index-url", []):
        args += ["--extra-index-url", url]
    for place in config.get("find-links", []):
        args += ["--find-links", place]
    for path in config.get("constraint", []):
        args += ["--constraint", path]
    if config.get("extra-index-url") or config.get("find-links"):
        args += ["--index-strategy", "unsafe-best-match"]
    return args


def pip_sources() -> list[str]:
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=True).stdout
    return uv_source_args(parse_pip_config(listing))


def compile_lock(extra_args: list[str], lock: Path = LOCK) -> None:
    """Run uv pip compile (it keeps the versions already in ``lock`` unless told to upgrade), then
    put the digest of pyproject.toml's dependency lists at the top of the lock."""
    cmd = [sys.executable, "-m", "uv", "pip", "compile", "pyproject.toml", "--all-extras",
           "--python-version", PYTHON_VERSION, "--custom-compile-command", "make lock", "--quiet",
           *pip_sources(), *extra_args, "--output-file", str(lock)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    body = [line for line in lock.read_text().splitlines() if not line.startswith(DIGEST_PREFIX)]
    lock.write_text("\n".join([DIGEST_PREFIX + dependency_digest(), *body]) + "\n")


def install(args: list[str]) -> None:
    """uv pip install into this interpreter's environment with the lock as constraints (``args``:
    what to install, e.g. ``-e .[dev]``), byte-compiled as pip would: the tests import the stack in
    many processes, and without .pyc files (or with PYTHONDONTWRITEBYTECODE set) each compiles it again."""
    cmd = [sys.executable, "-m", "uv", "pip", "install", "--python", sys.executable, "--constraint", str(LOCK),
           "--compile-bytecode", *pip_sources(), *args]
    # uv's lines as they come, but for the one line per package installed or removed (hundreds on a fresh
    # environment): those go to <environment>/install.log with the rest
    log = Path(sys.prefix) / "install.log"
    listed = 0
    with open(log, "w") as out, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                 text=True) as proc:
        for line in proc.stdout:
            out.write(line)
            if re.match(r"^ [-+~] \S", line):
                listed += 1
            else:
                print(line, end="", flush=True)
    if listed:
        print(f"({listed} packages installed, upgraded or removed: listed in {log})")
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("compile", "install"):
        sys.exit("usage: python tools/lock.py compile [uv pip compile options] | install [uv pip install arguments]")
    (compile_lock if argv[0] == "compile" else install)(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
