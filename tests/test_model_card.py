"""The model card (README.md) written beside every evaluated model: its content from the records, the
promotion gate writing it, and a model with its card still healthy and promotable."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from model_code.evaluation.evaluate import EvaluationRecord
from model_code.model.recipes import TrainedModel
from model_code.model_card import CARD_NAME, card_for_evaluation, render_base_card, render_model_card
from tests.conftest import REPO

METRICS = {
    "cot": {"R@1": 0.412, "R@5": 0.684, "R@10": 0.770, "R@50": 0.888, "R@1[edits=2]": 0.373, "n[edits=2]": 177,
            "cot_parsed": 1.0, "conclusion_exact": 0.272},
    "no_cot": {"R@1": 0.380, "R@5": 0.698, "R@10": 0.760, "R@50": 0.910, "R@1[edits=2]": 0.277, "n[edits=2]": 177},
    "image_only": {"R@1": 0.300, "R@5": 0.546, "R@10": 0.624, "R@50": 0.794},
}
VERDICT = {"passed": True, "headline": "R@10", "value": 0.77, "model_version": "v1", "split": "test",
           "checks": [{"name": "floor R@10", "passed": True, "detail": "0.7700 vs floor 0.6500"},
                      {"name": "no regression", "passed": True, "detail": "no production model yet"}]}


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


def _trained(path="/models/run/model", version="v1", base="/repo/model_code/model/embedded_base",
             trainable=4_800_000) -> TrainedModel:
    stage = {"steps": 40, "seconds": 61.5, "examples": 20000, "first": {"loss": 3.2}, "last": {"loss": 0.41},
             "val": {"acc": 0.93}}
    return TrainedModel(path=path, version=version, base=base, base_version="cc4d01725bd2f78b",
                        parameters={"total": 4_800_000, "trainable": trainable},
                        stages={"align": stage, "cot": {**stage, "steps": 140}},
                        data={"synthetic": {"raw": "raw123", "annotations": "ann456", "teacher": "oracle",
                                            "prompt_version": "oracle-v2"}})


def _record(trained: TrainedModel, folder="/a/evaluation/synthetic/test", dataset="synthetic", split="test",
            metrics=METRICS, headline="R@10") -> EvaluationRecord:
    return EvaluationRecord(dataset=dataset, split=split, folder=str(folder), model_version=trained.version,
                            model=trained.to_dict(), metrics=metrics, headline=headline, timings={}, queries=500)


def test_the_card_is_a_hugging_face_model_card_with_the_records_numbers():
    trained = _trained()
    text = render_model_card(trained, [(_record(trained), VERDICT)])
    front = _front_matter(text)
    assert front["license"] and front["library_name"] == "transformers" and front["base_model"] == "embedded_base"
    assert "composed-image-retrieval" in front["tags"] and front["datasets"] == ["synthetic"]
    body = text.split("\n---\n", 1)[1]
    for section in ("## Base", "## Data versions", "## Recipe", "## Evaluation", "## Gate verdict"):
        assert section in body
    # the evaluation table holds the record's numbers, one row per method, breakdowns left out
    assert "| method | R@1 | R@5 | R@10 | R@50 |" in body
    assert body.index("| cot |") < body.index("| no_cot |") < body.index("| image_only |")
    assert "| cot | 0.412 | 0.684 | 0.770 | 0.888 |" in body
    assert "| no_cot | 0.380 | 0.698 | 0.760 | 0.910 |" in body
    assert "| image_only | 0.300 | 0.546 | 0.624 | 0.794 |" in body
    assert "edits=2" not in body and "cot_parsed 1.000, conclusion_exact 0.272" in body
    # data versions, the base and the recipe
    assert "| synthetic | `raw123` | `ann456` | `oracle/oracle-v2` |" in body
    assert "`cc4d01725bd2f78b`" in body and "every parameter fine-tuned" in body
    assert "| cot | 140 | 20000 | 61.5 | 3.200 → 0.410 | 0.930 |" in body
    # the verdict, rule by rule
    assert "### synthetic / test: passed" in body and "- PASS floor R@10: 0.7700 vs floor 0.6500" in body
    assert "arxiv.org/abs/2510.08003" in body


def test_the_card_names_its_license_its_results_as_a_model_index_and_its_limitations(tmp_path):
    """The license is the base's own card's (the embedded base: MIT), else `other` naming the base's; the
    evaluation's CIR-CoT figures are Hugging Face's model-index; the limitations carry the reasoning's figure."""
    trained = _trained(base=str(REPO / "model_code" / "model" / "embedded_base"))
    text = render_model_card(trained, [(_record(trained), VERDICT)])
    front = _front_matter(text)
    assert front["license"] == "mit" and "license_name" not in front
    [entry] = front["model-index"]
    assert entry["name"] == "cir-cot:v1"
    [result] = entry["results"]
    assert result["dataset"] == {"type": "synthetic", "name": "synthetic", "split": "test"}
    assert result["task"]["type"] == "composed-image-retrieval"
    assert {(m["type"], m["value"]) for m in result["metrics"]} == {
        ("recall_at_1", 0.412), ("recall_at_5", 0.684), ("recall_at_10", 0.77), ("recall_at_50", 0.888)}
    limits = text.split("## Limitations", 1)[1].split("\n## ", 1)[0]
    assert "Evaluated only on synthetic / test (500 queries)" in limits and "exactly for 27.2% of the queries" in limits
    assert "knows only the synthetic benchmark's world" in limits
    # a base whose folder declares no license: `other`, named as the base's
    hub = render_model_card(_trained(base=str(tmp_path)), [], base_model="Qwen/Qwen2-VL-2B-Instruct")
    front = _front_matter(hub)
    assert front["license"] == "other" and front["license_link"] == "https://huggingface.co/Qwen/Qwen2-VL-2B-Instruct"
    assert "model-index" not in front and "Not evaluated: nothing is known" in hub
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a base\n")
    assert _front_matter(render_model_card(_trained(base=str(tmp_path)), []))["license"] == "apache-2.0"


def test_the_embedded_bases_card_is_its_record_rendered():
    """model_code/model/embedded_base/README.md is what render_base_card makes of its PRETRAINING.json
    (regenerate: .venv/bin/python -c "from model_code.model_card import write_base_card;
    write_base_card('model_code/model/embedded_base')"); `--publish` writes it."""
    folder = REPO / "model_code" / "model" / "embedded_base"
    record = json.loads((folder / "PRETRAINING.json").read_text())
    text = (folder / CARD_NAME).read_text()
    assert text == render_base_card(record)
    front = _front_matter(text)
    assert front["license"] == "mit" and front["library_name"] == "transformers"
    metrics = {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert metrics["edit_exact"] == record["perception"]["edit_exact"] and metrics["caption_exact"] == 1.0
    assert record["version"] in front["model-index"][0]["name"] and "## Limitations" in text


def test_a_lora_model_refused_by_the_gate_says_so_and_an_unevaluated_one_says_that():
    trained = _trained(trainable=10_000)
    refused = {**VERDICT, "passed": False,
               "checks": [{"name": "cot not worse than no_cot", "passed": False, "detail": "significantly worse"}]}
    text = render_model_card(trained, [(_record(trained), refused)], base_model="Qwen/Qwen2-VL-2B-Instruct")
    front = _front_matter(text)
    assert front["library_name"] == "peft" and front["base_model"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert front["base_model_relation"] == "adapter" and "LoRA adapter" in text
    assert "refused, not promoted" in text and "- FAIL cot not worse than no_cot: significantly worse" in text
    bare = render_model_card(trained)
    assert "Not evaluated yet." in bare and "No verdict yet." in bare
    assert _front_matter(bare)["datasets"] == ["synthetic"]


# ---- the card written by the pipeline, and the model still healthy ------------------------------


@pytest.fixture(scope="module")
def saved(micro_base, tmp_path_factory):
    """A saved LoRA model over the micro base, in an artifacts root laid out as the pipeline's."""
    from model_code.backbone import load_backbone
    from model_code.model.cir_cot import CirCoTModel, apply_lora, parameter_counts

    torch.manual_seed(0)
    model, processor = load_backbone(micro_base, device="cpu")
    m = CirCoTModel(apply_lora(model, processor, r=4, alpha=8), processor, base_path=str(micro_base))
    root = tmp_path_factory.mktemp("artifacts")
    path = root / "cir_cot_model" / "runs" / "k" / "model"
    version = m.save(path)
    trained = _trained(path=str(path), version=version, base=str(micro_base))
    trained.parameters = parameter_counts(m.model)
    return root, trained


def _gate(record: EvaluationRecord, **gate):
    """The promotion_gate check of assets/evaluation.py, run by Dagster after an evaluation asset that
    hands on ``record`` (the real one would evaluate a model)."""
    import dagster as dg

    from assets.common import dataset_partitions
    from assets.evaluation import promotion_gate
    from assets.resources import ArtifactStore, GateResource

    Path(record.folder).mkdir(parents=True, exist_ok=True)
    record.write(Path(record.folder) / "record.json")

    @dg.asset(name="evaluation", partitions_def=dataset_partitions)
    def evaluated() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"record": dg.MetadataValue.json(record.to_dict())})

    resources = {"gate": GateResource(**gate), "artifacts": ArtifactStore(root=str(Path(record.folder).parent))}
    result = dg.materialize([evaluated, promotion_gate], partition_key=record.dataset, raise_on_error=False,
                            instance=dg.DagsterInstance.ephemeral(), resources=resources)
    (check,) = result.get_asset_check_evaluations()
    return check


def test_the_promotion_gate_writes_the_card_and_the_model_stays_healthy_and_promotable(store, saved, tmp_path):
    from model_code.model.cir_cot import ModelFolderError, check_model_folder

    root, trained = saved
    model_dir = Path(trained.path)
    record = _record(trained, folder=root / "evaluation" / "synthetic" / "test")
    assert _gate(record).passed
    card = (model_dir / CARD_NAME).read_text()
    front = _front_matter(card)
    assert front["library_name"] == "peft" and front["base_model"] == Path(trained.base).name
    assert "| cot | 0.412 | 0.684 | 0.770 | 0.888 |" in card and "### synthetic / test: passed" in card
    assert f"# cir-cot:{trained.version}" in card
    # the card is outside the manifest: the folder checks out by content and promotes
    meta, _ = check_model_folder(model_dir, hashes=True)
    assert CARD_NAME not in meta["files"]
    promoted = store.promote(model_dir, version=trained.version, dataset="synthetic", labels={})
    assert promoted["changed"]
    entry = Path(store.production("synthetic")["path"])
    assert (entry / "model" / CARD_NAME).read_text() == card
    assert store.health(entry, hashes=True) == "ok"

    # a second evaluation of the same model (CIRR, refused by a floor): the card lists both, the
    # store entry's card follows on promotion, and the entry is still whole
    cirr = _record(trained, folder=root / "evaluation" / "cirr" / "val", dataset="cirr", split="val",
                   metrics={"cot": {"R@5": 0.5, "Avg": 0.41}, "no_cot": {"R@5": 0.4, "Avg": 0.35}}, headline="Avg")
    assert not _gate(cirr, floors='{"cirr": {"Avg": 0.9}}').passed
    card = (model_dir / CARD_NAME).read_text()
    assert _front_matter(card)["datasets"] == ["cirr", "synthetic"]
    assert "### cirr / val: refused, not promoted" in card and "### synthetic / test: passed" in card
    assert "| method | R@5 | Avg |" in card and "| cot | 0.500 | 0.410 |" in card
    store.promote(model_dir, version=trained.version, dataset="synthetic", labels={})   # already production
    assert (entry / "model" / CARD_NAME).read_text() == card
    assert store.health(entry, hashes=True) == "ok"
    assert store.load_promoted(dataset="synthetic", device="cpu").version == trained.version

    # a damaged weight file is still found, card or not
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    weights = bad / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ModelFolderError, match="adapter_model.safetensors"):
        store.promote(bad, version=trained.version, dataset="cirr", labels={})
    stored = entry / "model" / "adapter" / "adapter_model.safetensors"
    stored.write_bytes(stored.read_bytes()[:-10])
    assert store.health(entry).startswith("damaged")


def test_a_model_saved_again_into_a_folder_with_a_card_leaves_the_card_out_of_its_manifest(saved, tmp_path):
    from model_code.model.cir_cot import CirCoTModel, check_model_folder

    _, trained = saved
    folder = tmp_path / "again"
    folder.mkdir()
    (folder / CARD_NAME).write_text("an older card\n")
    model = CirCoTModel.load(trained.path, device="cpu")
    assert model.save(folder) == trained.version
    assert CARD_NAME not in json.loads((folder / "circot.json").read_text())["files"]
    (folder / CARD_NAME).write_text("a new card, longer than the old one\n")
    check_model_folder(folder, hashes=True)


def test_no_card_without_the_model_folder(tmp_path):
    trained = _trained(path=str(tmp_path / "gone"))
    assert card_for_evaluation(_record(trained, folder=tmp_path / "evaluation" / "synthetic" / "test"),
                               VERDICT) is None
    assert not (tmp_path / "gone").exists()
