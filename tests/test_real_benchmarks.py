"""The paper's experiment on real benchmark formats, end to end on a CPU: CIRR- and FashionIQ-format
roots built from the real annotation files (stand-in images under the benchmarks' own file names;
where the real files are not at hand, from made-up entries in their layout),
a micro Qwen2-VL checkpoint with an English tokenizer trained on their texts, placeholder chains
brought in through the file teacher; then, as `make run DATASET=...` does, per dataset: chains ->
checks -> LoRA training -> evaluation -> gate -> promotion -> index -> Bento, and CIRCO evaluated
zero-shot with the CIRR model. What is asserted is the wiring, never the micro model's figures."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from assets.resources import AnnotatorResource, GateResource, TrainingResource
from model_code.annotation.chains_file import chains_from_text, write_chains_file
from model_code.backbone import build_micro_checkpoint, texts_from_files
from model_code.data import annotation_files, read_dataset
from orchestration.__main__ import run as run_cli
from orchestration.definitions import build_definitions
from tests import _real_formats
from tests.conftest import REPO, SHARED_BENCHMARKS


def _published(name: str, tmp: Path) -> Path:
    """The benchmark's real annotation files where they are at hand, else a folder of made-up entries
    in their layout (so that the wiring is tested on a fresh clone too)."""
    path = SHARED_BENCHMARKS / name
    return path if path.is_dir() else _real_formats.made_up_annotations(name, tmp / f"{name}-annotations")


def _record_meta(instance, asset: str, partition: str):
    """The metadata of the newest materialisation of ``asset[partition]``."""
    (entry,) = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
    return entry.asset_materialization.metadata


def _record(instance, asset: str, partition: str) -> dict:
    return _record_meta(instance, asset, partition)["record"].value


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """CIRR (a train split carved from its val file, a val and a hidden test1), FashionIQ (three
    categories cut from the dress files) and CIRCO roots, small."""
    base = tmp_path_factory.mktemp("real")
    return {"cirr": _real_formats.cirr(_published("cirr", base), base / "cirr", train=24, val=12, test1=4),
            "fashioniq": _real_formats.fashioniq(_published("fashioniq", base), base / "fashioniq", train=8, val=4),
            "circo": _real_formats.circo(_published("circo", base), base / "circo", val=8, test=3, distractors=8)}


def test_each_training_dataset_gets_its_own_model_and_circo_is_evaluated_zero_shot(roots, tmp_path, store,
                                                                                    capsys):
    micro = build_micro_checkpoint(texts_from_files([f for name, root in roots.items()
                                                     for f in annotation_files(name, root)]), tmp_path / "micro",
                                   vocab_size=800)
    for name in ("cirr", "fashioniq"):   # CIRCO, evaluated zero-shot, is not annotated: no chains, no teacher
        write_chains_file(chains_from_text(read_dataset(name, roots[name], require_images=False).triplets),
                          tmp_path / "chains" / f"{name}.jsonl")
    kwargs = {"project_dir": str(REPO), "artifacts_root": str(tmp_path / "artifacts"), "dvc_push": False,
              "dataset_roots": {name: str(root) for name, root in roots.items()},
              "annotator": AnnotatorResource(kind="file", chains_file=str(tmp_path / "chains" / "{dataset}.jsonl")),
              # the micro figures mean nothing: the CoT rule runs but cannot refuse them
              "gate": GateResource(cot_tolerance=1.0)}

    with dg.instance_for_test() as instance:
        # the embedded base cannot read CIRR's words: refused before any work, naming what to set
        embedded = build_definitions(**kwargs, training=TrainingResource(profile="embedded"))
        assert run_cli("cirr", definitions=embedded, dagster_instance=instance) == 2
        refusal = capsys.readouterr().out
        assert "CIRCOT_PROFILE=gpu CIRCOT_BASE_MODEL_PATH=" in refusal and "CIRCOT_PROFILE=micro" in refusal
        assert not instance.get_runs()
        # CIRCO before any CIRR model: nothing to evaluate it with, and says which model it waits for
        micro_profile = TrainingResource(profile="micro", base_model_path=str(micro),
                                         overrides=["align.steps=4", "cot.steps=4"])
        defs = build_definitions(**kwargs, training=micro_profile)
        assert run_cli("circo", definitions=defs, dagster_instance=instance) == 1
        assert "evaluated zero-shot with the model trained on cirr" in capsys.readouterr().out

        for name in ("cirr", "fashioniq", "circo"):
            assert run_cli(name, definitions=defs, dagster_instance=instance) == 0, capsys.readouterr().out
        out = capsys.readouterr().out

        # one model per training dataset, each from its own data and chains, LoRA over the micro base
        cirr_model, fiq_model = _record(instance, "cir_cot_model", "cirr"), _record(instance, "cir_cot_model",
                                                                                    "fashioniq")
        cirr_chains = _record(instance, "cot_annotations", "cirr")
        assert cirr_model["dataset"] == "cirr" and set(cirr_model["data"]) == {"cirr"}   # not synthetic's
        assert cirr_model["data"]["cirr"]["annotations"] == cirr_chains["version"]
        assert cirr_model["data"]["cirr"]["teacher"] == "file:cirr.jsonl"
        assert cirr_model["data"]["cirr"]["raw"] == _record(instance, "raw_dataset", "cirr")["version"]
        assert set(fiq_model["data"]) == {"fashioniq"} and fiq_model["version"] != cirr_model["version"]
        assert cirr_model["parameters"]["trainable"] < cirr_model["parameters"]["total"]     # LoRA
        assert cirr_model["stages"]["align"]["examples"] == 24 and fiq_model["stages"]["align"]["examples"] == 24
        assert not instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("cir_cot_model"), asset_partitions=["circo"]), limit=1).records

        # each evaluated in domain with its own model; CIRCO zero-shot with the CIRR model
        cirr_eval, fiq_eval, circo_eval = (_record(instance, "evaluation", d) for d in ("cirr", "fashioniq", "circo"))
        assert (cirr_eval["split"], cirr_eval["model_version"], cirr_eval["trained_on"]) == (
            "val", cirr_model["version"], "cirr")
        assert {"R_subset@1", "Avg"} <= set(cirr_eval["metrics"]["cot"]) and cirr_eval["headline"] == "Avg"
        assert [Path(f).name for f in cirr_eval["submissions"]] == [
            "cirr_test1_cot_recall.json", "cirr_test1_cot_recall_subset.json",
            "cirr_test1_no_cot_recall.json", "cirr_test1_no_cot_recall_subset.json"]
        submitted = json.loads(Path(cirr_eval["submissions"][0]).read_text())
        assert submitted["version"] == "rc2" and len(submitted) == 2 + 4
        assert fiq_eval["model_version"] == fiq_model["version"] and "dress/R@10" in fiq_eval["metrics"]["cot"]
        assert (circo_eval["model_version"], circo_eval["trained_on"]) == (cirr_model["version"], "cirr")
        assert "mAP@10" in circo_eval["metrics"]["cot"]
        assert not instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("cot_annotations"), asset_partitions=["circo"]), limit=1).records
        (circo_submission,) = [json.loads(Path(f).read_text()) for f in circo_eval["submissions"]
                               if Path(f).name == "circo_test_cot.json"]
        assert len(circo_submission) == 3 and all(len(r) <= 50 for r in circo_submission.values())
        table = (Path(circo_eval["folder"]) / "table.md").read_text()
        assert "### circo / val — model " + cirr_model["version"] + ", zero-shot from cirr" in table
        gate = json.loads((Path(circo_eval["folder"]) / "gate.json").read_text())
        assert gate["passed"] and gate["note"].startswith("evaluated zero-shot from cirr")
        assert "- evaluated zero-shot from cirr" in out and "(zero-shot from cirr)" in out
        card = (Path(cirr_model["path"]) / "README.md").read_text()
        assert "### circo / val, zero-shot from cirr" in card and "### cirr / val" in card

        # promoted per dataset: the CIRR model for cirr and (zero-shot) circo, never for the others
        prod = {d: store.production(d) for d in ("synthetic", "fashioniq", "cirr", "circo")}
        assert prod["synthetic"] is None
        assert prod["cirr"]["version"] == prod["circo"]["version"] == cirr_model["version"]
        assert prod["fashioniq"]["version"] == fiq_model["version"]
        assert prod["circo"]["labels"]["zero_shot_from_circo"] == "cirr" and "zero_shot_from_cirr" not in prod[
            "cirr"]["labels"]
        assert prod["cirr"]["labels"]["trained_on"] == "cirr"
        from orchestration.__main__ import main

        assert main(["models"]) == 0
        listed = capsys.readouterr().out
        assert f"cir-cot:{cirr_model['version']}" in listed and "on circo/val, zero-shot from cirr" in listed
        # an index and a Bento per dataset (one model serving two datasets: two Bentos)
        for d in ("cirr", "fashioniq", "circo"):
            index = _record_meta(instance, "gallery_index", d)
            assert index["model_version"].value == prod[d]["version"]
            assert _record_meta(instance, "bento", d)["tag"].value == f"circot:{d}-{prod[d]['version']}"

