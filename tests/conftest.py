"""Shared fixtures: offline, isolated homes, a tiny synthetic benchmark, a throwaway DVC project."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = Path(os.environ.get("CIRCOT_SHARED_BENCHMARKS", REPO.parent / "shared" / "benchmarks"))

# Tiny sizes: a few seconds to generate, enough queries for every kind of edit to show up.
TINY_PARAMS = {
    "seed": 7, "image_size": 64, "max_edits": 3,
    "train": {"references": 30, "modifications_per_reference": 2, "distractors_per_target": 1},
    "val": {"references": 10, "modifications_per_reference": 1, "distractors_per_target": 2},
    "test": {"references": 12, "modifications_per_reference": 1, "distractors_per_target": 2},
}


@pytest.fixture(autouse=True, scope="session")
def _isolated_environment(tmp_path_factory):
    home = tmp_path_factory.mktemp("homes")
    env = {"HF_HUB_OFFLINE": "1", "GX_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
           "DAGSTER_HOME": str(home / "dagster"), "BENTOML_HOME": str(home / "bentoml")}
    old = {k: os.environ.get(k) for k in env}
    (home / "dagster").mkdir()
    os.environ.update(env)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def shared_benchmark(name: str) -> Path:
    path = SHARED_BENCHMARKS / name
    if not path.is_dir():
        pytest.skip(f"real {name} annotations not found at {path} (set CIRCOT_SHARED_BENCHMARKS)")
    return path


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A tiny cir-shapes benchmark, generated once per session. Tests must not modify it."""
    from model_code.synthetic.generate import SyntheticParams, generate

    out = tmp_path_factory.mktemp("synthetic") / "cir-shapes"
    generate(SyntheticParams.model_validate(TINY_PARAMS), out)
    return out


@pytest.fixture
def synthetic_copy(tiny_synthetic, tmp_path) -> Path:
    """A private copy of the tiny benchmark that a test may damage."""
    dst = tmp_path / "cir-shapes"
    shutil.copytree(tiny_synthetic, dst)
    return dst


def make_dvc_project(path: Path, params: dict = TINY_PARAMS) -> Path:
    """A DVC project like the repository's (its dvc.yaml, the generator's code) with tiny
    parameters and a local remote of its own, both under ``path``."""
    import yaml

    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", path / "dvc.yaml")
    (path / "model_code").symlink_to(REPO / "model_code")
    (path / "params.yaml").write_text(yaml.safe_dump({"synthetic": params}))
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=path, check=True)
    subprocess.run([*dvc, "config", "core.analytics", "false"], cwd=path, check=True)
    subprocess.run(
        [*dvc, "remote", "add", "-d", "local", str(path.parent / (path.name + "-remote"))], cwd=path, check=True
    )
    return path


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory, tiny_synthetic) -> Path:
    """A very small random Qwen2-VL (a few hundred thousand parameters, 56 px images: 4 image
    tokens) with the CIR tokens, saved as a checkpoint folder, for fast model and training tests."""
    from model_code.backbone import BackboneShape, build_random_backbone, save_backbone
    from model_code.data import read_dataset
    from model_code.model.cir_cot import PROMPTS, add_cir_tokens

    shape = BackboneShape(text_hidden=64, text_layers=2, text_heads=2, text_kv_heads=1, text_intermediate=128,
                          vision_embed=32, vision_depth=2, vision_heads=2, image_size=56)
    corpus = list(read_dataset("synthetic", tiny_synthetic).triplets.modification) + list(PROMPTS.values())
    model, processor = build_random_backbone(shape, corpus * 3, vocab_size=400)
    add_cir_tokens(model, processor)
    return save_backbone(model, processor, tmp_path_factory.mktemp("micro") / "micro-qwen2-vl")
