"""The typed records one stage hands the next (``model_code.records.Record``, pydantic models): JSON
round trips, files of older and newer versions, and values of the wrong type refused."""

import json

import pydantic
import pytest

from model_code.annotation.store import AnnotationsRecord
from model_code.data.tables import TablesRecord
from model_code.evaluation.evaluate import EvaluationRecord
from model_code.model.pretrain import PretrainRecord
from model_code.model.recipes import BaseModelRecord, StageSummary, TrainedModel

STAGE = {"steps": 20, "seconds": 3.5, "examples": 64, "first": {"loss": 2.5, "step": 1},
         "last": {"loss": 0.5, "step": 20}, "val": {"acc": 0.75}}


def _records() -> list:
    trained = TrainedModel(path="runs/x/model", version="abc", base="bases/tiny", base_version="b1",
                           parameters={"total": 10, "trainable": 4}, stages={"align": STAGE, "cot": STAGE},
                           data={"synthetic": {"raw": "r1", "annotations": "a1"}})
    return [
        TablesRecord(dataset="synthetic", folder="t/v1", root="data/raw/synthetic", raw_version="r1", version="v1",
                     queries={"train": 3, "val": 1}, images={"train": 5}),
        AnnotationsRecord(dataset="synthetic", path="a/annotations.parquet", teacher="oracle", prompt_version="p1",
                          version="a1", raw_version="r1", min_acceptance=0.95, splits=["train", "val"], ok=3,
                          rejected=1),
        BaseModelRecord(path="bases/tiny", kind="embedded", version="b1", parameters={"total": 10},
                        training={"steps": 5, "history": [{"loss": 1.0}]}),
        StageSummary(**STAGE),
        trained,
        EvaluationRecord(dataset="synthetic", split="test", folder="e/test", model_version="abc",
                         model=trained.to_dict(), metrics={"cot": {"R@10": 0.7}}, headline="R@10",
                         timings={"cot": {"per_s": 2.0}}, raw_version="r1", queries=4, submissions=["s.json"]),
        PretrainRecord(path="m", version="p1", config={"steps": 10}, steps=10, seconds=1.5,
                       perception={"edit_exact": 0.5}, history_last={"step": 10}),
    ]


@pytest.mark.parametrize("record", _records(), ids=lambda r: type(r).__name__)
def test_a_record_round_trips_through_json_and_ignores_keys_it_does_not_know(record, tmp_path):
    cls = type(record)
    data = record.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON, nested dicts and lists included
    record.write(tmp_path / "r.json")
    back = cls.read(tmp_path / "r.json")
    assert back == record and back.to_dict() == data
    # a newer version's file, with a field this version does not know
    assert cls.from_dict({**data, "written_by": "a newer pipeline"}) == record


def test_a_record_written_by_the_dataclass_version_still_reads(tmp_path):
    # meta.json exactly as the earlier (dataclass) records wrote it, before `category` existed
    (tmp_path / TablesRecord.META).write_text(json.dumps({
        "dataset": "synthetic", "folder": str(tmp_path), "root": "data/raw/synthetic", "raw_version": "r1",
        "version": "v1", "require_images": True, "queries": {"train": 3}, "images": {"train": 5}}))
    record = TablesRecord.load(tmp_path)
    assert record.category is None and record.queries == {"train": 3} and record.root == "data/raw/synthetic"
    assert "META" not in record.to_dict()  # a class constant, not a field


def test_a_record_refuses_values_of_the_wrong_type_when_made_read_or_assigned(tmp_path):
    with pytest.raises(pydantic.ValidationError, match="kind"):
        BaseModelRecord(path="p", kind="huge", version="v")
    with pytest.raises(pydantic.ValidationError, match="raw_version"):
        TablesRecord.from_dict({"dataset": "synthetic", "folder": "f", "root": "r"})  # a required field missing
    (tmp_path / "meta.json").write_text(json.dumps({"dataset": "synthetic", "folder": "f", "root": "r",
                                                    "raw_version": "r1", "queries": "three"}))
    with pytest.raises(pydantic.ValidationError, match="queries"):
        TablesRecord.load(tmp_path)
    trained = TrainedModel(path="p", version="", base="b", base_version="bv", parameters={}, stages={})
    trained.version, trained.plot = "abc", "training.png"  # what the training fills in after the fact
    assert trained.to_dict()["version"] == "abc" and trained.plot == "training.png"
    with pytest.raises(pydantic.ValidationError, match="data"):
        trained.data = ["synthetic"]


def test_defaults_are_not_shared_and_nested_records_come_back_typed():
    a = TablesRecord(dataset="synthetic", folder="f", root="r", raw_version="r1")
    b = TablesRecord(dataset="synthetic", folder="f", root="r", raw_version="r1")
    a.queries["train"] = 3
    assert b.queries == {} and AnnotationsRecord(dataset="d", path="p", teacher="t", prompt_version="p",
                                                 version="v", raw_version="r").splits == []
    evaluation = next(r for r in _records() if isinstance(r, EvaluationRecord))
    trained = TrainedModel.from_dict(evaluation.model)  # exactly the model that was evaluated
    assert trained.stage("cot") == StageSummary(**STAGE) and trained.stage("cot").last["loss"] == 0.5
