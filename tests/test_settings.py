"""The settings from the environment (model_code.settings): typed, checked, documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_code.settings import (
    PREFIX,
    ROOT_FIELDS,
    PipelineSettings,
    ServiceSettings,
    environment_errors,
    load,
    reference,
)

ROOT = Path(__file__).resolve().parents[1]


def test_the_configuration_page_is_generated_from_the_settings():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == reference(), "docs/configuration.md is stale: python -m model_code.settings > docs/configuration.md"
    for cls in (PipelineSettings, ServiceSettings):
        for name in cls.model_fields:   # the benchmarks' roots are one pattern row (`circot benchmarks` lists them)
            assert f"`{PREFIX}{name.upper()}`" in page or name in ROOT_FIELDS
    assert f"`{PREFIX}<BENCHMARK>_ROOT`" in page


def test_every_benchmark_root_variable_is_a_setting(monkeypatch, tmp_path):
    from model_code.benchmarks import BENCHMARKS

    for spec in BENCHMARKS.values():
        if spec.root_env:
            monkeypatch.setenv(spec.root_env, str(tmp_path / spec.name))
    roots = load(PipelineSettings)[0].dataset_roots()
    assert roots == {n: str(tmp_path / n) for n, s in BENCHMARKS.items() if s.root_env}
    assert ROOT_FIELDS == {f"{n}_root" for n, s in BENCHMARKS.items() if s.configured} and len(ROOT_FIELDS) == 3


def test_a_zero_shot_source_without_a_train_split_is_refused(monkeypatch):
    assert load(PipelineSettings)[0].zero_shot_source == "cirr"
    monkeypatch.setenv("CIRCOT_ZERO_SHOT_SOURCE", "circo")
    settings, errors = load(PipelineSettings)
    assert settings.zero_shot_source == "cirr" and errors == [
        "CIRCOT_ZERO_SHOT_SOURCE='circo' is not a benchmark with a train split (synthetic, fashioniq, cirr)"]


def test_an_unusable_value_falls_back_to_its_default_and_is_reported(monkeypatch):
    monkeypatch.setenv("CIRCOT_TRAINING_PROCESSES", "two")
    monkeypatch.setenv("CIRCOT_GATE_MAX_REGRESSION", "0.05")
    settings, errors = load(PipelineSettings)
    assert settings.training_processes == 1 and settings.gate_max_regression == 0.05
    assert errors == ["CIRCOT_TRAINING_PROCESSES='two' is not a whole number of at least 1"]


def test_an_empty_optional_variable_means_unset(monkeypatch):
    monkeypatch.setenv("CIRCOT_TEACHER_URL", " ")
    monkeypatch.setenv("CIRCOT_API_TOKEN", "")
    assert load(PipelineSettings) == (PipelineSettings(), [])
    assert load(ServiceSettings)[0].api_token is None


def test_service_settings_are_checked(monkeypatch):
    monkeypatch.setenv("CIRCOT_SERVE_DATASET", "coco")
    monkeypatch.setenv("CIRCOT_MAX_K", "0")
    monkeypatch.setenv("CIRCOT_ADAPTIVE_BATCHING", "off")
    monkeypatch.setenv("CIRCOT_COT_QUEUE", "0")
    monkeypatch.setenv("CIRCOT_REASONER_THREADS", "2")
    settings, errors = load(ServiceSettings)
    assert settings.adaptive_batching is False and settings.serve_dataset == "synthetic"
    assert settings.reasoner_threads == 2 and settings.cot_queue == ServiceSettings.model_fields["cot_queue"].default
    assert sorted(errors) == ["CIRCOT_COT_QUEUE='0' is not a whole number of at least 1",
                              "CIRCOT_MAX_K='0' is not a whole number of at least 1",
                              "CIRCOT_SERVE_DATASET='coco' is not a benchmark (synthetic, fashioniq, cirr, circo)"]


def test_a_run_refuses_to_start_with_an_unusable_setting_while_the_definitions_load(monkeypatch, tmp_path):
    """The Dagster UI still loads; every run fails at once naming the variable."""
    import dagster as dg

    from orchestration.definitions import build_definitions

    monkeypatch.setenv("CIRCOT_GATE_COT_CONFIDENCE", "nan")
    monkeypatch.setenv("CIRCOT_RETRAIN_CRON", "weekly")
    assert len(environment_errors()) == 2
    defs = build_definitions(artifacts_root=str(tmp_path / "artifacts"), project_dir=str(tmp_path))
    artifacts = defs.resources["artifacts"]
    with pytest.raises(dg.Failure, match="CIRCOT_GATE_COT_CONFIDENCE='nan' is out of range") as failure:
        artifacts.setup_for_execution(None)
    assert "CIRCOT_RETRAIN_CRON='weekly' is not a cron expression" in failure.value.description
    schedule, = [s for s in defs.schedules if s.name == "retrain_schedule"]
    assert schedule.cron_schedule == "0 3 * * 1"


def test_the_gallery_s_extra_splits_are_a_list_of_split_names(monkeypatch):
    monkeypatch.setenv("CIRCOT_GALLERY_EXTRA_SPLITS", " train ,val")
    assert load(PipelineSettings)[0].extra_gallery_splits() == ["train", "val"]
    monkeypatch.setenv("CIRCOT_GALLERY_EXTRA_SPLITS", "train; rm -rf /")
    settings, errors = load(PipelineSettings)
    assert settings.extra_gallery_splits() == [] and errors == [
        "CIRCOT_GALLERY_EXTRA_SPLITS='train; rm -rf /' is not a comma-separated list of split names (e.g. 'train')"]
