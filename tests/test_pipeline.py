"""DVC versioning of the synthetic benchmark and in-process Dagster materialisation."""

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets.resources import GateResource, TrainingResource
from model_code.annotation.store import read_annotations
from model_code.data import read_tables
from model_code.data.versioning import DvcProject
from orchestration.__main__ import run as run_cli
from orchestration.definitions import EVALUATION_JOB, PIPELINE_JOB, TRAINING_JOB, build_definitions
from tests.conftest import TINY_PARAMS, make_dvc_project, shared_benchmark


@pytest.fixture
def dvc_project(tmp_path):
    return make_dvc_project(tmp_path / "project")


def test_repro_runs_once_reruns_on_param_change_and_pulls_from_the_remote(dvc_project):
    project = DvcProject(dvc_project)
    (out,) = project.reproduce("synthetic")
    assert out.path == "data/raw/synthetic" and out.md5.endswith(".dir") and out.nfiles > 100
    assert (dvc_project / out.path / "captions" / "cap.train.json").is_file()

    again = project.run("repro", "--pull", "synthetic")
    assert "didn't change, skipping" in again.stdout
    assert project.is_up_to_date("synthetic")

    # push, lose the workspace copy and the cache: repro restores it from the remote, not by regenerating
    project.push("synthetic")
    shutil.rmtree(dvc_project / out.path)
    shutil.rmtree(dvc_project / ".dvc" / "cache")
    restored = project.run("repro", "--pull", "synthetic")
    assert "Running stage" not in restored.stdout
    assert (dvc_project / out.path / "captions" / "cap.train.json").is_file()
    assert project.outputs("synthetic") == [out]

    params = yaml.safe_load((dvc_project / "params.yaml").read_text())
    params["synthetic"]["seed"] += 1
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params))
    rerun = project.run("repro", "--pull", "synthetic")
    assert "Running stage 'synthetic'" in rerun.stdout
    assert project.outputs("synthetic")[0].md5 != out.md5


def _execute(defs, job, partition=None, run_config=None, instance=None, asset_selection=None):
    """Run ``job`` (its ``asset_selection`` only, when given); (result, check evaluations,
    materialisations, step failures). Jobs that follow one another share ``instance``: each reads
    its inputs from what the instance recorded."""
    with contextlib.ExitStack() as stack:
        instance = instance or stack.enter_context(dg.instance_for_test())
        result = defs.resolve_job_def(job).execute_in_process(
            partition_key=partition, instance=instance, raise_on_error=False, run_config=run_config,
            asset_selection=asset_selection)
        checks = {e.event_specific_data.check_name: e.event_specific_data for e in result.all_events
                  if e.event_type_value == "ASSET_CHECK_EVALUATION"}
        mats = {e.event_specific_data.materialization.asset_key.to_user_string(): e.event_specific_data.materialization
                for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"}
        failures = [e.event_specific_data.error.message for e in result.all_events if e.is_step_failure]
        return result, checks, mats, failures


def trained_tables(mats) -> str:
    return mats["triplets"].metadata["record"].value["folder"]


def _materialise(defs, partition, run_config=None, instance=None):
    return _execute(defs, PIPELINE_JOB, partition, run_config, instance)


def test_synthetic_partition_materialises_with_dvc_versioning_and_passing_checks(dvc_project, tmp_path):
    artifacts = tmp_path / "artifacts"
    defs = build_definitions(project_dir=str(dvc_project), artifacts_root=str(artifacts), dataset_roots={})
    result, checks, mats, failures = _materialise(defs, "synthetic")
    assert result.success, failures
    assert set(mats) == {"raw_dataset", "triplets", "cot_annotations"}
    assert {name: c.passed for name, c in checks.items()} == {"triplets_suite": True, "images_suite": True,
                                                               "annotations_suite": True}

    (out,) = DvcProject(dvc_project).outputs("synthetic")
    assert mats["raw_dataset"].tags["dagster/data_version"] == out.md5
    assert mats["raw_dataset"].metadata["data_version"].value == out.md5
    remote = tmp_path / "project-remote"
    assert remote.is_dir() and sum(1 for p in remote.rglob("*") if p.is_file()) >= out.nfiles  # pushed

    record = mats["triplets"].metadata["record"].value
    folder = artifacts / "triplets" / "synthetic" / "versions" / record["version"]
    assert record["folder"] == str(folder)
    tables = read_tables(folder)
    expected_queries = sum(TINY_PARAMS[s]["references"] * TINY_PARAMS[s]["modifications_per_reference"]
                           for s in ("train", "val", "test"))
    assert len(tables.triplets) == expected_queries
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["raw_version"] == out.md5 and meta["queries"]["test"] == TINY_PARAMS["test"]["references"]
    assert mats["triplets"].metadata["raw_data_version"].value == out.md5
    assert "| test |" in mats["triplets"].metadata["per_split"].value

    # oracle annotations for every query, 100 % accepted, with lineage and examples
    ann = mats["cot_annotations"].metadata
    assert (ann["ok"].value, ann["rejected"].value, ann["teacher"].value) == (expected_queries, 0, "oracle")
    assert ann["raw_data_version"].value == out.md5 and ann["examples"].value.count("- reasoning:") == 5
    assert mats["cot_annotations"].tags["dagster/data_version"] == ann["annotation_version"].value
    table = read_annotations(mats["cot_annotations"].metadata["record"].value["path"])
    assert len(table) == expected_queries and set(table.status) == {"ok"}

    # materialising again annotates nothing new
    result, _, mats, _ = _materialise(defs, "synthetic")
    assert result.success and mats["cot_annotations"].metadata["annotated_this_run"].value == 0


def test_unconfigured_partition_fails_and_says_how_to_add_it(dvc_project, tmp_path):
    defs = build_definitions(project_dir=str(dvc_project), artifacts_root=str(tmp_path / "a"), dataset_roots={})
    result, _, mats, failures = _materialise(defs, "circo")
    assert not result.success and not mats
    assert any("CIRCOT_CIRCO_ROOT" in f and "no data root configured" in f for f in failures)


def test_real_annotations_only_partition_and_a_failing_gate(dvc_project, tmp_path):
    source = shared_benchmark("circo")
    root = tmp_path / "circo"
    shutil.copytree(source, root)
    defs = build_definitions(project_dir=str(dvc_project), artifacts_root=str(tmp_path / "a"),
                             dataset_roots={"circo": str(root)})
    config = {"ops": {"triplets": {"config": {"require_images": False}}}}
    result, checks, mats, failures = _materialise(defs, "circo", config)
    assert set(mats) == {"raw_dataset", "triplets"}
    assert mats["raw_dataset"].metadata["versioned_by"].value.startswith("md5 of the annotation files")
    assert {name: c.passed for name, c in checks.items()} == {"triplets_suite": True, "images_suite": True}
    # a real dataset needs a teacher: without one, annotation fails and says how to configure it
    assert not result.success and any("CIRCOT_TEACHER_MODEL_PATH" in f for f in failures)

    # plant an empty modification text: the blocking check fails and the run reports it
    with dg.instance_for_test() as instance:
        good = _materialise(defs, "circo", config, instance)[2]["triplets"].metadata["record"].value
        ann = json.loads((root / "annotations" / "val.json").read_text())
        ann[0]["relative_caption"] = ""
        (root / "annotations" / "val.json").write_text(json.dumps(ann))
        result, checks, mats, failures = _materialise(defs, "circo", config, instance)
        assert not result.success and "cot_annotations" not in mats  # the blocking check stopped it
        assert checks["triplets_suite"].passed is False and "FAILED 1 of" in checks["triplets_suite"].description
        assert mats["raw_dataset"].tags["dagster/data_version"] != ""
        # the rejected table did not replace the one that passed: it has a folder of its own, and what
        # downstream reads is still the version that passed (regression test: it was overwritten in place)
        from types import SimpleNamespace

        from assets.common import TABLE_CHECKS, latest_record
        from assets.resources import ArtifactStore

        bad = mats["triplets"].metadata["record"].value
        assert bad["folder"] != good["folder"] and bad["version"] != good["version"]
        assert read_tables(good["folder"]).triplets.modification.str.strip().ne("").all()
        ctx = SimpleNamespace(instance=instance, resources=SimpleNamespace(artifacts=ArtifactStore(root=str(tmp_path))))
        assert latest_record(ctx, "triplets", "circo")["version"] == bad["version"]
        assert latest_record(ctx, "triplets", "circo", passed=TABLE_CHECKS)["version"] == good["version"]


def test_cli_runs_the_job_and_reports(dvc_project, tmp_path, capsys):
    defs = build_definitions(project_dir=str(dvc_project), artifacts_root=str(tmp_path / "a"), dataset_roots={})
    assert run_cli("synthetic", definitions=defs, train=False) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "cir_pipeline [synthetic]: succeeded" in out and "triplets:triplets_suite passed" in out
    assert str(tmp_path / "a" / "triplets" / "synthetic") in out
    # Dagster's INFO lines on the console in the short form; its DEBUG events only in the run's log file
    assert re.search(r"^\d\d:\d\d:\d\d raw_dataset: \$ dvc repro --pull synthetic", captured.err, re.M), captured.err
    assert "STEP_START" not in captured.err and "RESOURCE_INIT" not in captured.err
    log = Path(re.search(r"every event: (\S+\.log)\)", out).group(1))
    assert log.parent == Path(os.environ["DAGSTER_HOME"]) / "run_logs"
    assert "STEP_START" in log.read_text() and "dvc repro --pull synthetic" in log.read_text()
    # verbose (circot run -v): the DEBUG events on the console too
    assert run_cli("synthetic", definitions=defs, train=False, verbose=True) == 0
    assert "STEP_START: Started execution of step \"raw_dataset\"" in capsys.readouterr().err


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def test_training_then_evaluation_gate_and_promotion(dvc_project, tmp_path, capsys, instance, micro_base):
    import torch

    from model_code import registry
    from model_code.model.cir_cot import CirCoTModel

    artifacts = tmp_path / "artifacts"
    smoke = TrainingResource(profile="smoke", base_model_path=str(micro_base))
    defs = build_definitions(project_dir=str(dvc_project), artifacts_root=str(artifacts), dataset_roots={},
                             training=smoke)
    result, _, mats_first, failures = _materialise(defs, "synthetic", instance=instance)
    assert result.success, failures
    run, _, mats, failures = _execute(defs, TRAINING_JOB, "synthetic", instance=instance)
    assert run.success, failures
    base, model = mats["base_model"].metadata, mats["cir_cot_model"].metadata
    assert base["kind"].value == "checkpoint" and base["path"].value == str(micro_base.resolve())
    assert model["align_steps"].value == 3 and model["cot_steps"].value == 3
    assert model["base_version"].value == base["model_version"].value
    assert model["parameters_trainable"].value == model["parameters_total"].value   # the embedded recipe: in full
    assert mats["cir_cot_model"].tags["dagster/data_version"] == model["model_version"].value
    # the trained model's record is in the materialisation (the lineage the evaluation reads), not a latest.json
    trained = model["record"].value
    assert trained["data"]["synthetic"]["teacher"] == "oracle" and trained["version"] == model["model_version"].value
    assert not (artifacts / "cir_cot_model" / "latest.json").exists()
    loaded = CirCoTModel.load(trained["path"], device="cpu")
    emb = loaded.embed_images(
        [next((tmp_path / "project" / "data" / "raw" / "synthetic" / "images" / "test").glob("*.png"))]
    )
    assert emb.shape == (1, 64) and torch.isfinite(emb).all()      # the micro base's hidden size

    # evaluation, the blocking gate, promotion: a floor the model cannot reach (on a metric cir-shapes does
    # not measure) stops the promotion...
    for entry in registry.list_models():
        import bentoml

        bentoml.models.delete(entry["tag"])
    eval_config = {"ops": {"evaluation": {"config": {"limit": 6, "max_new_tokens": 8, "batch_size": 8}}}}
    strict = build_definitions(project_dir=str(dvc_project), artifacts_root=str(artifacts), dataset_roots={},
                               training=smoke, gate=GateResource(floors='{"R@3": 0.5}'))
    run, checks, mats, _ = _execute(strict, EVALUATION_JOB, "synthetic", eval_config, instance)
    assert [c.passed for c in checks.values()] == [False] and "floor R@3" in checks["promotion_gate"].description
    assert "promoted_model" not in mats and registry.production("synthetic") is None
    ev = mats["evaluation"].metadata
    assert set(ev["metrics"].value) == {"cot", "no_cot", "image_only", "text_only"} and ev["queries"].value == 6
    assert ev["record"].value["model_version"] == trained["version"]
    assert "| cot |" in ev["table"].value and "data:image/png;base64" in ev["qualitative"].value
    assert (
        json.loads((artifacts / "evaluation" / "synthetic" / "test" / "metrics.json").read_text())
        == ev["metrics"].value
    )
    # the command line prints the table and the gate's verdict rule by rule
    from orchestration.__main__ import run_job

    assert not run_job(EVALUATION_JOB, "synthetic", strict, eval_config, instance)
    out = capsys.readouterr().out
    assert "- FAIL floor R@3:" in out and "| image_only |" in out
    # ...and with floors it reaches, the model is promoted into the BentoML store, labelled with its lineage
    lenient = build_definitions(project_dir=str(dvc_project), artifacts_root=str(artifacts), dataset_roots={},
                                training=smoke,
                                gate=GateResource(floors='{"synthetic": {"R@10": 0.0, "R@50": 0.5}}',
                                                  cot_not_worse=False))
    run, checks, mats, failures = _execute(lenient, EVALUATION_JOB, "synthetic", eval_config, instance)
    assert run.success, failures
    # ...and the production model's gallery index is built, tagged with its version, and checked
    index = mats["gallery_index"].metadata
    n_test = len(read_tables(trained_tables(mats_first)).images.query("split == 'test'"))
    assert index["rows"].value == n_test and index["model_version"].value == trained["version"]
    assert index["tag"].value == f"model-{trained['version']}" and index["index_type"].value == "exact"
    # the check compares the stored vectors with the promoted model's embedding of the same images now
    verdict = checks["index_recall"]
    assert verdict.passed, verdict.description
    assert {k: verdict.metadata[k].value for k in ("images_of_split", "rows", "missing", "extra", "vectors_compared",
                                                   "vectors_differing")} == {
        "images_of_split": n_test, "rows": n_test, "missing": 0, "extra": 0, "vectors_compared": min(64, n_test),
        "vectors_differing": 0}
    assert verdict.metadata["min_cosine"].value > 0.999 and "no ANN index" in verdict.description
    assert "top 5:" in index["example"].value
    # ...and the service is packaged with that model
    bento = mats["bento"].metadata
    assert bento["tag"].value == f"circot:synthetic-{trained['version']}" and bento["size_mib"].value > 0
    assert bento["model"].value == f"cir-cot:{trained['version']}"
    # ...and delivered: exported to the artifacts store with manifests that validate (no cluster: nothing applied)
    delivered = mats["deployment"].metadata
    assert delivered["tag"].value == bento["tag"].value and delivered["target"].value == "none"
    assert delivered["applied"].value == [] and Path(delivered["export"].value).is_file()
    delivery = artifacts / "deployments" / "synthetic" / f"synthetic-{trained['version']}"
    assert Path(delivered["export"].value).parent == delivery
    from assets.deployment import validate

    manifests = list(yaml.safe_load_all(Path(delivered["manifests"].value).read_text()))
    assert validate(manifests, "1.31") == [] and manifests[-1]["metadata"]["annotations"]["circot/model"] == (
        f"cir-cot:{trained['version']}")
    # evaluated again with the same production model (new gallery images, a sensor): the Bento is rebuilt
    run, _, mats, failures = _execute(lenient, EVALUATION_JOB, "synthetic", eval_config, instance)
    assert run.success, failures
    assert mats["bento"].metadata["tag"].value == f"circot:synthetic-{trained['version']}"
    prod = registry.production("synthetic")
    assert prod["version"] == trained["version"] and prod["labels"]["stage_synthetic"] == "production"
    # a stored vector changed after the build (searched exactly, the index would still agree with exact search
    # over its own vectors): the index built again keeps it (nothing to embed), and its check fails, naming it
    changed = _change_a_stored_vector(artifacts / "lancedb", trained["version"])
    rebuilt, rechecked, remade, _ = _execute(lenient, EVALUATION_JOB, "synthetic", instance=instance,
                                             asset_selection=[dg.AssetKey("gallery_index")])
    assert not rebuilt.success and remade["gallery_index"].metadata["embedded_this_run"].value == 0
    verdict = rechecked["index_recall"]
    assert verdict.passed is False and verdict.metadata["vectors_differing"].value == 1
    assert f"1 of {min(64, n_test)} stored vectors differ" in verdict.description and changed in verdict.description
    assert prod["labels"]["data_synthetic"] == trained["data"]["synthetic"]["raw"]
    assert prod["labels"]["annotations_synthetic"] == trained["data"]["synthetic"]["annotations"]
    assert prod["labels"]["evaluated_on_synthetic"] == "synthetic/test"
    assert prod["labels"]["headline_synthetic"].startswith("R@10=")
    # the gate wrote the model card beside the model, with this evaluation and verdict; promotion carried it
    card = (Path(trained["path"]) / "README.md").read_text()
    r10 = mats["evaluation"].metadata["metrics"].value["cot"]["R@10"]
    assert card.startswith("---\n") and f"# cir-cot:{trained['version']}" in card
    assert f"{r10:.3f}" in card and "### synthetic / test: passed" in card
    assert (Path(prod["path"]) / "model" / "README.md").read_text() == card
    assert registry.health(prod["path"], hashes=True) == "ok"
    # the evaluation reads the model Dagster's lineage names: a fresh instance has none, and says so
    run, _, _, failures = _execute(lenient, EVALUATION_JOB, "synthetic", eval_config)
    assert not run.success and any("cir_cot_model[synthetic] has not been materialised" in f for f in failures)


def _change_a_stored_vector(uri, model_version: str) -> str:
    """Negate the first stored vector of the index built for ``model_version``, and move its tag there."""
    from model_code.index import GalleryIndex

    index = GalleryIndex(uri, "synthetic")
    ids, vectors = index.vectors(model_version)
    table = index.db.open_table(index.table_name)
    table.update(where=f"image_id = '{ids[0]}'", values={"vector": (-vectors[0]).tolist()})
    table.tags.update(index.tag(model_version), table.version)
    return ids[0]


def test_gpu_profile_needs_a_checkpoint_and_registers_one(dvc_project, tmp_path, micro_base):
    from assets.training import base_model

    artifacts = tmp_path / "artifacts"
    with pytest.raises(dg.Failure, match="CIRCOT_BASE_MODEL_PATH"):
        dg.materialize(
            [base_model],
            resources={
                "training": TrainingResource(profile="gpu"),
                "artifacts": build_definitions(artifacts_root=str(artifacts)).resources["artifacts"],
            },
        )
    result = dg.materialize([base_model], resources={
        "training": TrainingResource(profile="gpu", base_model_path=str(micro_base)),
        "artifacts": build_definitions(artifacts_root=str(artifacts)).resources["artifacts"]})
    meta = result.asset_materializations_for_node("base_model")[0].metadata
    assert meta["kind"].value == "checkpoint" and meta["path"].value == str(micro_base.resolve())


def _kill_training_when(path, stop):
    """Kill the launched training processes (torchrun and its workers) once ``path`` exists: the file
    the training writes where it holds after its first checkpoint (``CIRCOT_HOLD_AFTER_CHECKPOINT``),
    so the kill lands mid-run however fast the machine trains. Returns how many it killed."""
    import os
    import signal
    import time

    import psutil

    while not stop.is_set():
        if path.exists():
            killed = 0
            for p in psutil.Process().children(recursive=True):
                try:
                    if "model_code.model.recipes" in " ".join(p.cmdline()):
                        os.kill(p.pid, signal.SIGKILL)
                        killed += 1
                except (psutil.NoSuchProcess, ProcessLookupError):
                    pass
            return killed
        time.sleep(0.05)
    return 0


def test_training_launched_through_pipes_in_two_processes_dies_and_resumes(dvc_project, tmp_path, instance,
                                                                           micro_base, monkeypatch):
    """cir_cot_model as an external process (PipesSubprocessClient + torchrun, two CPU processes on
    gloo): killed after its first checkpoint, the run fails; the next run resumes from that
    checkpoint, and the child's progress and result come back as logs and metadata."""
    import threading

    import torch

    from model_code.model.train import HOLD_AFTER_CHECKPOINT_ENV

    artifacts = tmp_path / "artifacts"
    defs = build_definitions(project_dir=str(dvc_project), artifacts_root=str(artifacts), dataset_roots={},
                             training=TrainingResource(profile="smoke", base_model_path=str(micro_base),
                                                       launcher="subprocess", processes=2))
    assert _materialise(defs, "synthetic", instance=instance)[0].success
    config = {"ops": {"cir_cot_model": {"config": {"align_steps": 12}}}}
    stop, killed = threading.Event(), []
    held = tmp_path / "held-after-checkpoint"
    monkeypatch.setenv(HOLD_AFTER_CHECKPOINT_ENV, str(held))   # the training waits there to be killed
    watcher = threading.Thread(target=lambda: killed.append(_kill_training_when(held, stop)), daemon=True)
    watcher.start()
    run, _, mats, failures = _execute(defs, TRAINING_JOB, "synthetic", run_config=config, instance=instance)
    stop.set()
    watcher.join(10)
    monkeypatch.delenv(HOLD_AFTER_CHECKPOINT_ENV)
    assert killed and killed[0] >= 2, killed                  # torchrun and its workers, killed while held
    assert not run.success and "cir_cot_model" not in mats, failures
    causes = []
    for event in run.all_events:
        error = event.event_specific_data.error if event.is_step_failure else None
        while error is not None:
            causes.append(error.message)
            error = error.cause
    assert any("External execution process failed with code -9" in c for c in causes), causes
    (run_dir,) = (artifacts / "cir_cot_model" / "runs").iterdir()
    state = torch.load(run_dir / "align" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 2                 # what the next run resumes from: the first checkpoint, of 12 steps
    assert Path(held.read_text()).resolve() == (run_dir / "align" / "checkpoint").resolve()   # where it held
    assert not (run_dir / "model").exists() and not (run_dir / "cot").exists()   # killed mid-run, in stage 1
    from model_code.model.recipes import PROFILES, TrainingProfile

    # the processes were handed the whole profile, the run's override applied, as one file
    handed = TrainingProfile.load(run_dir / "profile.json")
    assert handed == PROFILES["smoke"].with_overrides(base={"checkpoint_path": str(micro_base)}, align={"steps": 12})

    run, _, mats, failures = _execute(defs, TRAINING_JOB, "synthetic", run_config=config, instance=instance)
    assert run.success, failures
    meta = mats["cir_cot_model"].metadata
    assert meta["launched_processes"].value == 2 and meta["align_steps"].value == 12
    assert meta["model_version"].value == meta["record"].value["version"]
    logs = [r.user_message for r in instance.all_logs(run.run_id)]
    assert any("resuming from the checkpoint at step 2" in m for m in logs), logs[-20:]


def test_an_object_store_artifacts_root_lets_each_stage_run_on_another_machine(dvc_project, tmp_path, instance,
                                                                             monkeypatch, micro_base):
    """The artifacts root as an fsspec URI (``memory://`` here, ``s3://`` in a deployment): every
    stage runs on a "machine" whose local copy starts empty, and finds what the others wrote."""
    import uuid

    import fsspec

    root, cache = f"memory://circot-{uuid.uuid4().hex[:8]}", tmp_path / "pod-cache"
    monkeypatch.setenv("CIRCOT_ARTIFACTS_CACHE", str(cache))
    defs = build_definitions(project_dir=str(dvc_project), artifacts_root=root, dataset_roots={},
                             training=TrainingResource(profile="smoke", base_model_path=str(micro_base)),
                             gate=GateResource(floors='{"synthetic": {"R@10": 0.0, "R@50": 0.0}}', cot_not_worse=False))
    result, _, mats, failures = _materialise(defs, "synthetic", instance=instance)
    assert result.success, failures
    fs, _ = fsspec.core.url_to_fs(root)
    folder = mats["triplets"].metadata["record"].value["folder"]
    remote = root.split("://")[1] + "/" + str(Path(folder).relative_to(cache))
    assert fs.exists(remote + "/triplets.parquet") and fs.exists(remote + "/checks/triplets_suite.json")

    shutil.rmtree(cache)   # the training pod: the same mount point, an empty disk
    run, _, mats, failures = _execute(defs, TRAINING_JOB, "synthetic", instance=instance)
    assert run.success, failures
    model_dir = Path(mats["cir_cot_model"].metadata["record"].value["path"])

    shutil.rmtree(cache)   # the evaluation pod
    eval_config = {"ops": {"evaluation": {"config": {"limit": 6, "max_new_tokens": 8, "batch_size": 8}}}}
    run, checks, mats, failures = _execute(defs, EVALUATION_JOB, "synthetic", eval_config, instance)
    assert run.success, failures
    assert (model_dir / "circot.json").is_file() and checks["promotion_gate"].passed
    assert mats["gallery_index"].metadata["model_version"].value == mats["evaluation"].metadata["record"].value[
        "model_version"]
