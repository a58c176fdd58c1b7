"""The benchmark specs (model_code.benchmarks): each one coherent, and the facts the pipeline reads."""

from __future__ import annotations

import pandas as pd
import pytest

from model_code.benchmarks import (
    BENCHMARKS,
    BenchmarkSpec,
    UnknownBenchmarkError,
    benchmark,
    model_source,
    names,
    training_names,
)
from model_code.data import DATASETS, HIDDEN_SPLITS, SPLITS
from model_code.evaluation.metrics import reference_exclusions

# model_code.evaluation.evaluate (torch): imported where used (slow to import; the other tests here need none of it)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_spec_is_coherent(name):
    spec = benchmark(name)
    assert spec.name == name
    assert spec.scored_split in spec.splits and spec.scored_split not in spec.hidden_splits
    assert set(spec.hidden_splits) <= set(spec.splits)
    assert spec.submission_split is None or spec.submission_split in spec.hidden_splits
    assert list(spec.ks) == sorted(set(spec.ks)) and spec.ks[-1] <= 50
    assert (spec.root_env is None) != (spec.dvc_stage is None), "a benchmark is either configured or generated"
    assert spec.root_env is None or spec.root_env == f"CIRCOT_{name.upper()}_ROOT"
    module = spec.reader()
    assert all(callable(getattr(module, f)) for f in ("read", "split_files", "annotation_files"))
    assert (spec.submission_split is not None) == hasattr(module, "submissions")
    assert all(0 <= v <= 1 for v in spec.gate_floors.values())
    assert set(spec.headline_of) <= set(spec.metric_names()) and spec.headline in spec.metric_names()
    assert spec.train_split is None or spec.train_split not in spec.hidden_splits


def test_unknown_benchmark_names_the_known_ones():
    with pytest.raises(UnknownBenchmarkError, match="known: synthetic, fashioniq, cirr, circo"):
        benchmark("coco")


def test_specs_are_read_only():
    with pytest.raises(TypeError):
        BENCHMARKS["synthetic"].gate_floors["R@10"] = 0.0
    with pytest.raises(AttributeError):
        BENCHMARKS["synthetic"].headline = "R@1"


def test_views_follow_the_specs():
    assert DATASETS == names() and training_names() == ("synthetic", "fashioniq", "cirr")
    assert SPLITS["circo"] == ("val", "test") and ("cirr", "test1") in HIDDEN_SPLITS
    assert reference_exclusions("cirr", ["a"]) == [{"a"}] and reference_exclusions("circo", ["a"]) is None


def test_headline_per_query_averages_to_the_headline():
    """The per-query headline (the gate's paired test) is the same computation as the headline."""
    from model_code.evaluation.evaluate import Group, headline_per_query, score

    queries = pd.DataFrame({"query_id": ["q1", "q2", "q3"], "target_ids": [["a"], ["b"], ["c"]],
                            "subset_ids": [["a", "x"], ["b", "y"], ["z", "c"]],
                            "n_edits": [None] * 3, "reference_dependent": [None] * 3})
    ranked = {"cot": [["x", "a"], ["b"], ["z", "y", "x", "w", "v", "c"]]}
    for dataset in ("synthetic", "cirr", "circo"):
        per_group = [(Group("", queries, [], []), ranked)]
        headline = benchmark(dataset).headline
        per_query = headline_per_query(dataset, per_group, "cot")
        assert sum(per_query.values()) / 3 == pytest.approx(score(dataset, per_group, ["cot"])["cot"][headline])
    # CIRR by hand: q1 R@5 1, R_subset@1 0 (x first); q2 1, 1; q3 0 (c at rank 6), R_subset@1 0 (z first)
    assert headline_per_query("cirr", [(Group("", queries, [], []), ranked)], "cot") == {"q1": 0.5, "q2": 1.0,
                                                                                       "q3": 0.0}


def test_a_benchmark_without_a_train_split_is_evaluated_with_the_configured_source():
    assert model_source("cirr", "fashioniq").name == "cirr"          # a training benchmark: its own model
    assert model_source("circo", "cirr").name == "cirr"
    assert model_source(benchmark("circo"), "fashioniq").name == "fashioniq"
    with pytest.raises(UnknownBenchmarkError, match="has no train split"):
        model_source("circo", "circo")


def test_a_spec_whose_headline_is_not_its_metric_is_refused():
    with pytest.raises(ValueError, match="headline"):
        BenchmarkSpec(name="x", title="X", splits=("val",), scored_split="val", ks=(1, 5), headline="R@10",
                      excludes_reference=False, module="x")
    with pytest.raises(ValueError, match="train split"):
        BenchmarkSpec(name="x", title="X", splits=("val",), scored_split="val", ks=(1,), headline="R@1",
                      excludes_reference=False, module="x", train_split="train")


def test_the_command_line_lists_each_benchmark_from_its_spec(capsys, monkeypatch):
    from orchestration.__main__ import main

    monkeypatch.setenv("CIRCOT_CIRR_ROOT", "/data/cirr")
    monkeypatch.setenv("CIRCOT_ZERO_SHOT_SOURCE", "fashioniq")
    assert main(["benchmarks"]) == 0
    out = capsys.readouterr().out
    for spec in BENCHMARKS.values():
        assert f"{spec.name} ({spec.title})" in out and f"headline {spec.headline}" in out
    assert "CIRCOT_CIRR_ROOT=/data/cirr: the folder holding captions/" in out
    assert "CIRCOT_FASHIONIQ_ROOT=(unset)" in out and "generated by the DVC stage 'synthetic'" in out
    assert "evaluated zero-shot with the model of fashioniq" in out and out.count("trained on its 'train' split") == 3
