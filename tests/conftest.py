"""Shared fixtures: offline, isolated homes, a tiny synthetic benchmark, a throwaway DVC project, a free port,
a headless Chromium page (Playwright driving the system's chromium)."""

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

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


def flip_last_byte(path: Path) -> None:
    """Damage a file without changing its size: its last byte inverted (in a safetensors file, a byte of
    the last tensor's data, so the file still loads)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_path() -> str:
    """The chromium the browser tests drive: ``$CIRCOT_CHROMIUM``, else ``chromium`` or ``chromium-browser`` on
    PATH (Debian's package; Playwright never downloads one). Missing, the test skips with the reason, or fails
    where ``CIRCOT_REQUIRE_BROWSER=1`` (set by ``.ci/run``, where the browser tests must run)."""
    if configured := os.environ.get("CIRCOT_CHROMIUM"):
        found = configured if os.path.isfile(configured) and os.access(configured, os.X_OK) else None
        reason = f"chromium not found at CIRCOT_CHROMIUM={configured}"
    else:
        found = shutil.which("chromium") or shutil.which("chromium-browser")
        reason = "chromium not found: apt-get install chromium (or set CIRCOT_CHROMIUM to its path)"
    if found:
        return found
    if os.environ.get("CIRCOT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}; CIRCOT_REQUIRE_BROWSER=1 says the browser tests must run", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def page() -> Iterator[Page]:
    """A page of a fresh headless chromium (1280 x 1400), launched by its path; waits time out after 90 s."""
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.set_default_timeout(90_000)
            yield page
        finally:
            browser.close()


@pytest.fixture
def store():
    """The model registry on the session's BENTOML_HOME (a temporary folder), emptied of cir-cot models."""
    import bentoml

    from model_code import registry

    for entry in registry.list_models():
        bentoml.models.delete(entry["tag"])
    return registry
