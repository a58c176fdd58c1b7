"""The annotation store survives a crash and resumes; the annotation gate catches planted defects."""

import dataclasses
import os
import time

import pandas as pd
import pytest

from model_code.annotation.judge import judge
from model_code.annotation.quality import LengthBounds, validate_annotations
from model_code.annotation.store import (
    AnnotationStore,
    annotate_missing,
    annotation_requests,
    annotation_version,
    read_annotations,
    write_annotations,
)
from model_code.data import read_dataset
from model_code.synthetic.generate import SyntheticParams, generate
from model_code.synthetic.oracle import OracleAnnotator
from tests.conftest import TINY_PARAMS


@pytest.fixture
def bench(tiny_synthetic):
    return read_dataset("synthetic", tiny_synthetic)


@pytest.fixture
def requests_(bench, tiny_synthetic):
    return annotation_requests(bench.triplets, bench.images, tiny_synthetic)


class CountingAnnotator:
    """The oracle, counting what it is asked, crashing on the chunk number ``crash_on``."""

    def __init__(self, root, crash_on=None, prompt_version="oracle-v1"):
        self.inner = OracleAnnotator(root)
        self.name, self.prompt_version = "oracle", prompt_version
        self.default_min_acceptance = 1.0
        self.asked, self.chunks, self.crash_on = [], 0, crash_on

    def annotate(self, requests):
        self.chunks += 1
        if self.chunks == self.crash_on:
            raise KeyboardInterrupt("simulated crash")
        self.asked += [r.query_id for r in requests]
        return [dataclasses.replace(a, prompt_version=self.prompt_version) for a in self.inner.annotate(requests)]


def test_requests_skip_hidden_targets_and_respect_splits_and_limit(bench, tiny_synthetic):
    t = bench.triplets.copy()
    t.at[0, "target_ids"] = []
    assert len(annotation_requests(t, bench.images, tiny_synthetic)) == len(t) - 1
    test_only = annotation_requests(bench.triplets, bench.images, tiny_synthetic, splits=["test"], limit=5)
    assert len(test_only) == 5 and all(r.query_id.startswith("test-") for r in test_only)
    assert all(r.reference_path.is_file() and r.target_path.is_file() for r in test_only)


def test_resume_after_a_crash_annotates_only_what_is_missing(tmp_path, tiny_synthetic, requests_):
    store = AnnotationStore(tmp_path / "store")
    crashing = CountingAnnotator(tiny_synthetic, crash_on=3)
    with pytest.raises(KeyboardInterrupt):
        annotate_missing(store, crashing, requests_, chunk_size=10)
    assert len(crashing.asked) == 20 and len(store.table()) == 20  # two chunks stored before the crash

    # a half-written part is ignored; one left by a crash long ago is cleaned up, a fresh one (a live
    # writer's, in another process) is left alone
    crashed, live = tmp_path / "store" / ".part-1.parquet.tmp", tmp_path / "store" / ".part-2.parquet.tmp"
    crashed.write_bytes(b"PAR1 garbage")
    live.write_bytes(b"PAR1 garbage")
    os.utime(crashed, (time.time() - 2 * 3600,) * 2)
    store = AnnotationStore(tmp_path / "store")
    assert not crashed.exists() and live.exists()
    live.unlink()
    resumed = CountingAnnotator(tiny_synthetic)
    stats = annotate_missing(store, resumed, requests_, chunk_size=10)
    assert sorted(resumed.asked) == sorted({r.query_id for r in requests_} - set(crashing.asked))
    assert (stats.already_done, stats.annotated, stats.ok) == (20, len(requests_) - 20, len(requests_) - 20)
    assert len(store.table()) == len(requests_) and not list((tmp_path / "store").glob("*.tmp"))

    again = CountingAnnotator(tiny_synthetic)
    assert annotate_missing(store, again, requests_).annotated == 0 and again.asked == []

    # a new prompt version is a new key: everything is annotated again, the old rows stay
    v2 = CountingAnnotator(tiny_synthetic, prompt_version="oracle-v2")
    annotate_missing(store, v2, requests_)
    assert len(v2.asked) == len(requests_)
    assert len(store.table()) == 2 * len(requests_) and len(store.table(prompt_version="oracle-v1")) == len(requests_)
    before = store.table().sort_values(["query_id", "prompt_version"]).reset_index(drop=True)
    store.compact()
    assert len(store.parts()) == 1
    after = store.table().sort_values(["query_id", "prompt_version"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)


def test_rejected_rows_are_kept_with_their_reason(tmp_path):
    store = AnnotationStore(tmp_path)
    store.append([dataclasses.replace(judge("q1", "t", "v", "nonsense"), content_key="k1"),
                  dataclasses.replace(judge("q2", "t", "v", "<caption>a</caption><reasoning>b</reasoning>"
                                                            "<conclusion>c</conclusion>"), content_key="k2")])
    table = store.table()
    assert dict(zip(table.query_id, table.status)) == {"q1": "rejected", "q2": "ok"}
    assert table.set_index("query_id").loc["q1", "reject_reason"] == "missing_section"
    assert table.set_index("query_id").loc["q1", "raw"] == "nonsense"


def test_version_is_a_content_hash(tmp_path, tiny_synthetic, requests_):
    rows = OracleAnnotator(tiny_synthetic).annotate(requests_)
    store = AnnotationStore(tmp_path)
    with pytest.raises(ValueError, match="content key"):
        store.append(rows)
    store.append([dataclasses.replace(a, content_key=r.content_key) for r, a in zip(requests_, rows)])
    assert len(store.table()) == len(requests_)
    table = store.table()
    write_annotations(table, tmp_path / "a.parquet")
    back = read_annotations(tmp_path / "a.parquet")
    assert annotation_version(back) == annotation_version(table) == annotation_version(table.iloc[::-1])
    changed = table.copy()
    changed.loc[0, "reasoning"] = "something else"
    assert annotation_version(changed) != annotation_version(table)


def _oracle_table(tiny_synthetic, requests_):
    rows = OracleAnnotator(tiny_synthetic).annotate(requests_)
    return pd.DataFrame([dataclasses.asdict(r) for r in rows])


def _failed(report):
    return {o.description for o in report.failed}


def test_gate_passes_the_oracle_and_catches_planted_defects(tiny_synthetic, requests_, bench):
    good = _oracle_table(tiny_synthetic, requests_)
    assert validate_annotations(good, bench.triplets, min_acceptance=1.0).success

    bad = good.copy()
    bad.loc[0, "reasoning"] = bad.loc[0, "reasoning"] + " As the target image shows, it is red."
    bad.loc[1, "conclusion"] = bad.loc[1, "caption"]
    bad.loc[2, "caption"] = "  "
    bad.loc[3, ["status", "caption", "reasoning", "conclusion", "reject_reason"]] = ["rejected", None, None, None, None]
    bad.loc[4, "query_id"] = "not-a-query"
    report = validate_annotations(bad, bench.triplets, min_acceptance=1.0)
    assert _failed(report) == {
        "reasoning never mentions a target/second image",
        "the conclusion differs from the caption when the text asks for a change",
        "accepted captions are not empty",
        "acceptance rate at least 100%",
        "every rejection records its reason",
        "every annotated query is in the triplets table",
    }
    text = report.to_text()
    assert good.loc[0, "query_id"] in text and good.loc[1, "query_id"] in text


def test_gate_acceptance_floor_and_length_bounds(tiny_synthetic, requests_, bench):
    table = _oracle_table(tiny_synthetic, requests_)
    n_reject = len(table) // 10 + 1
    table.loc[: n_reject - 1, ["status", "reject_reason"]] = ["rejected", "missing_section"]
    assert validate_annotations(table, bench.triplets, min_acceptance=0.5).success
    report = validate_annotations(table, bench.triplets, min_acceptance=0.95)
    assert _failed(report) == {"acceptance rate at least 95%"}
    report = validate_annotations(table, bench.triplets, min_acceptance=0.5,
                                  length_bounds={"reasoning": LengthBounds(p05_min=5, p95_max=10)})
    assert _failed(report) == {"reasoning length: 5th percentile >= 5 words, 95th <= 10"}


def test_all_rejected_teacher_fails_the_gate_on_acceptance(tiny_synthetic, requests_, bench):
    rows = [judge(r.query_id, "local:tiny", "teacher-v1", "random tokens") for r in requests_]
    table = pd.DataFrame([dataclasses.asdict(r) for r in rows])
    assert _failed(validate_annotations(table, bench.triplets, min_acceptance=0.95)) == {"acceptance rate at least 95%"}
    assert {(r.status, r.reject_reason, r.raw) for r in rows} == {("rejected", "missing_section", "random tokens")}


def test_a_regenerated_dataset_is_annotated_again_not_served_stale_chains(tmp_path):
    """Query ids are positional: after the data changes (another seed here) the same ids name other
    scenes. Annotations are keyed by content, so every changed query is annotated again and the
    chains describe the new scenes (regression test: they were keyed by query id and reused)."""
    root = tmp_path / "cir-shapes"
    store = AnnotationStore(tmp_path / "store")

    def annotate(seed):
        generate(SyntheticParams.model_validate({**TINY_PARAMS, "seed": seed}), root)
        bench = read_dataset("synthetic", root)
        requests = annotation_requests(bench.triplets, bench.images, root)
        oracle = OracleAnnotator(root)
        stats = annotate_missing(store, oracle, requests, progress=lambda s: None)
        return stats, requests, store.view(requests, oracle.name, oracle.prompt_version), oracle

    first, requests_a, view_a, _ = annotate(seed=1)
    assert first.annotated == len(requests_a) == len(view_a)
    again, _, _, _ = annotate(seed=1)  # same data: nothing to do
    assert again.annotated == 0
    second, requests_b, view_b, oracle = annotate(seed=2)
    assert [r.query_id for r in requests_b] == [r.query_id for r in requests_a]  # the same ids...
    assert second.annotated == len(requests_b)                                  # ...all annotated again
    fresh = {a.query_id: a.conclusion for a in oracle.annotate(requests_b)}
    assert dict(zip(view_b.query_id, view_b.conclusion)) == fresh                # chains of the new scenes
    assert dict(zip(view_a.query_id, view_a.conclusion)) != fresh


def test_an_id_the_oracle_does_not_know_is_not_stored_as_the_content_s_annotation(tmp_path, tiny_synthetic,
                                                                                   requests_):
    """A feedback triplet asked of the oracle (which knows queries by id) is rejected as unknown;
    stored under its content key, that rejection would stand for the benchmark query of the same
    content, which would then never be annotated (regression test)."""
    store = AnnotationStore(tmp_path / "store")
    oracle = OracleAnnotator(tiny_synthetic)
    stranger = dataclasses.replace(requests_[0], query_id="fb-0123-t-abc")   # the same images and text
    stats = annotate_missing(store, oracle, [stranger], progress=lambda s: None)
    assert (stats.unknown, stats.annotated, stats.failed) == (1, 0, 0) and len(store.table()) == 0
    stats = annotate_missing(store, oracle, [requests_[0]], progress=lambda s: None)
    assert (stats.annotated, stats.ok) == (1, 1)
    view = store.view([stranger], oracle.name, oracle.prompt_version)       # now the stranger gets its chain
    assert list(view.query_id) == [stranger.query_id] and list(view.status) == ["ok"]
