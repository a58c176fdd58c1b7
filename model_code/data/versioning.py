"""Data versioning with DVC: run or pull a stage, push to the remote, and read content hashes.

DVC is driven through its command line (``python -m dvc`` of this interpreter), the interface it
keeps stable. Stage commands in ``dvc.yaml`` call ``python``: the interpreter's own folder is put
first on PATH so that they run in the same environment as the caller.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

log = logging.getLogger(__name__)


class DvcError(RuntimeError):
    """A DVC command failed; the message carries its output."""


@dataclasses.dataclass(frozen=True)
class TrackedOutput:
    path: str          # relative to the DVC project
    md5: str           # DVC content hash (a directory hash ends in '.dir')
    size: int | None
    nfiles: int | None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


@dataclasses.dataclass
class DvcProject:
    """A DVC project folder (holding ``dvc.yaml``); ``remote`` None means its default remote."""

    root: Path
    remote: str | None = None
    echo: Callable[[str], None] | None = None  # receives DVC's output line by line (progress of long stages)

    def __post_init__(self):
        self.root = Path(self.root).resolve()

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``dvc *args``; its output (stdout and stderr merged) streams to ``echo`` and is
        returned as ``stdout``."""
        cmd = [sys.executable, "-m", "dvc", *args]
        echo = self.echo or log.info
        echo(f"$ dvc {' '.join(args)}   (in {self.root})")
        proc = subprocess.Popen(cmd, cwd=self.root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip():
                echo(line.rstrip())
        code = proc.wait()
        out = "".join(lines)
        if check and code != 0:
            raise DvcError(f"`dvc {' '.join(args)}` failed in {self.root} (exit {code}):\n{out.strip()[-3000:]}")
        return subprocess.CompletedProcess(cmd, code, out, "")

    def _remote_args(self) -> list[str]:
        return ["-r", self.remote] if self.remote else []

    def reproduce(self, stage: str) -> list[TrackedOutput]:
        """Bring ``stage``'s outputs up to date: pulled from the remote when the remote already
        holds them for the current code and parameters, regenerated when those changed, left alone
        when already current. Returns the outputs with their content hashes."""
        self.run("repro", "--pull", stage)
        return self.outputs(stage)

    def push(self, stage: str) -> None:
        self.run("push", *self._remote_args(), stage)

    def pull(self, stage: str) -> None:
        self.run("pull", *self._remote_args(), stage)

    def is_up_to_date(self, stage: str) -> bool:
        proc = self.run("status", stage, "--json")
        reports = [line for line in proc.stdout.splitlines() if line.startswith("{")]  # skip any warnings
        return json.loads(reports[-1] if reports else "{}") == {}

    def outputs(self, stage: str) -> list[TrackedOutput]:
        """The outputs of ``stage`` as recorded in ``dvc.lock``."""
        lock = self.root / "dvc.lock"
        if not lock.is_file():
            raise DvcError(f"{lock} does not exist: stage {stage!r} was never reproduced")
        data = yaml.safe_load(lock.read_text()) or {}
        try:
            outs = data["stages"][stage]["outs"]
        except KeyError:
            raise DvcError(f"{lock} has no outputs for stage {stage!r}") from None
        return [TrackedOutput(o["path"], o["md5"], o.get("size"), o.get("nfiles")) for o in outs]

    def tracked_hash(self, path: str | os.PathLike) -> str | None:
        """The DVC hash of ``path`` when a ``<path>.dvc`` file (``dvc add``) tracks it, else None."""
        path = Path(path)
        dvc_file = path.with_name(path.name + ".dvc")
        if not dvc_file.is_file():
            return None
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
        return outs[0]["md5"] if outs else None

    def pull_path(self, path: str | os.PathLike) -> None:
        """``dvc pull`` the ``.dvc`` file that tracks ``path``."""
        path = Path(path)
        self.run("pull", *self._remote_args(), str(path.with_name(path.name + ".dvc")))
