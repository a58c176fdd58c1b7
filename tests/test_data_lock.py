"""The committed dvc.lock matches the code and parameters it records.

A fresh clone runs `make run`, and DVC regenerates the synthetic benchmark whenever a dependency's
hash in dvc.lock differs from the file: the run then takes longer, rewrites dvc.lock and leaves the
tree dirty. This fails first, naming the file, so the lock is updated (`.venv/bin/dvc repro
synthetic` and commit dvc.lock) in the same commit as the code it hashes.
"""

import hashlib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_dvc_lock_matches_the_code_and_parameters_it_hashes():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    locked = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(locked) == set(stages), "dvc.lock and dvc.yaml name different stages: run `dvc repro`"
    for name, stage in stages.items():
        lock = locked[name]
        hint = f"stage {name!r}: run `.venv/bin/dvc repro {name}` and commit dvc.lock with the change"
        assert " ".join(lock["cmd"].split()) == " ".join(stage["cmd"].split()), f"command changed; {hint}"
        assert sorted(d["path"] for d in lock["deps"]) == sorted(stage["deps"]), f"dependencies changed; {hint}"
        for dep in lock["deps"]:
            assert dep.get("hash", "md5") == "md5"
            assert _md5(REPO / dep["path"]) == dep["md5"], f"{dep['path']} changed since dvc.lock; {hint}"
        for key in stage.get("params", []):
            assert lock["params"]["params.yaml"][key] == params[key], f"params.yaml '{key}' changed; {hint}"
