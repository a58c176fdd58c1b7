"""The feedback loop's pipeline (issue 26): feedback_triplets and its check, online_metrics and the
feedback sensor, materialised on the tiny synthetic benchmark after people's answers were written
into the feedback store as the service writes them."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from pathlib import Path

import dagster as dg
import pytest

from assets.cot_annotations import cot_annotations
from assets.feedback import feedback_suite, feedback_triplets, online_metrics
from assets.gallery_index import _gallery
from assets.resources import AnnotatorResource, ArtifactStore
from assets.triplets import images_suite, triplets, triplets_suite
from model_code.annotation.judge import judge
from model_code.annotation.store import read_annotations
from model_code.data import read_tables
from model_code.data.tables import TablesRecord, image_paths
from model_code.feedback import FeedbackStore, token_identity
from model_code.feedback_tables import read_feedback_tables, write_feedback_tables
from tests._png import drawn, pixels

D = "synthetic"


@pytest.fixture(scope="module")
def tables(tiny_synthetic, tmp_path_factory) -> TablesRecord:
    """The tiny benchmark's triplets tables, materialised once and passed by their checks."""
    root = tmp_path_factory.mktemp("tables-artifacts")
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization("raw_dataset", partition=D, metadata={
            "record": dg.MetadataValue.json({"root": str(tiny_synthetic), "version": "tiny"})}))
        result = dg.materialize([triplets, triplets_suite, images_suite], partition_key=D, instance=instance,
                                resources={"artifacts": ArtifactStore(root=str(root))})
        assert result.success
        return TablesRecord.from_dict(result.asset_materializations_for_node("triplets")[0].metadata["record"].value)


@pytest.fixture
def instance(tables):
    """A Dagster instance whose newest triplets[synthetic] are those tables."""
    with dg.instance_for_test() as inst:
        inst.report_runless_asset_event(dg.AssetMaterialization("triplets", partition=D, metadata={
            "record": dg.MetadataValue.json(tables.to_dict())}))
        yield inst


class Benchmark:
    """What the tests pick from the tiny benchmark: train queries, images by split, their bytes."""

    def __init__(self, tables: TablesRecord):
        self.bench = read_tables(tables.folder)
        self.paths = {i: p for (_, i), p in image_paths(self.bench.images, tables.root).items()}
        im = self.bench.images
        self.train = list(im[im.split == "train"].image_id)
        self.test = list(im[im.split == "test"].image_id)
        t = self.bench.triplets
        self.train_queries = t[t.split == "train"].reset_index(drop=True)

    def bytes(self, image_id: str) -> bytes:
        return self.paths[image_id].read_bytes()


def png(seed: int) -> bytes:
    """A new image (no image of the benchmark)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), (seed * 40 % 256, 90, 200)).save(out, format="PNG")
    return out.getvalue()


def ask(store, reference: bytes, modification: str, shown, token: str, version: str = "m1") -> str:
    """A query the service answered (what /search records)."""
    return store.record_query(reference=reference, suffix=".png", modification=modification, model_version=version,
                              mode="cot", chain=None, shown=shown, scores=[1.0 - i / 10 for i in range(len(shown))],
                              token=token)


def _materialise(assets, instance, artifacts, annotator=None, run_config=None):
    return dg.materialize(assets, partition_key=D, instance=instance, raise_on_error=False, run_config=run_config,
                          resources={"artifacts": ArtifactStore(root=str(artifacts)),
                                     "annotator": annotator or AnnotatorResource()})


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_answers_become_checked_versioned_annotated_triplets_without_leaks_and_capped(tables, instance, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("CIRCOT_FEEDBACK_CAP_PER_TOKEN", "2")
    b = Benchmark(tables)
    artifacts = tmp_path / "artifacts"
    # the benchmark's own annotations first (cot_annotations): a feedback triplet of the same content reuses them
    assert _materialise([cot_annotations], instance, artifacts).success
    store = FeedbackStore(artifacts / "feedback" / D, D)
    q0 = b.train_queries.iloc[0]
    target, wrong = q0.target_ids[0], next(i for i in b.train if i not in (q0.target_ids[0], q0.reference_id))
    held_out = b.test[0]
    # a person searched with a train image and a text the model got wrong, and picked the true target
    picked = ask(store, b.bytes(q0.reference_id), q0.modification, [wrong, target, held_out], "alice")
    store.add(picked, "alice", chosen=target, rejected=[wrong, held_out])
    new_ref = png(1)
    fresh = ask(store, new_ref, "make it blue", [b.train[3], b.train[4]], "alice")
    store.add(fresh, "alice", chosen=b.train[4], rejected=[b.train[3]])
    # two leaks: a test image as the reference (by content), a test image as the target
    leak_ref = ask(store, b.bytes(b.test[1]), "add a star", [b.train[5], b.train[6]], "carol")
    store.add(leak_ref, "carol", chosen=b.train[5])
    leak_target = ask(store, png(2), "remove the circle", [b.test[2], b.train[7]], "carol")
    store.add(leak_target, "carol", chosen=b.test[2])
    # one client answering more than the cap of 2
    for i in range(3):
        store.add(ask(store, png(10 + i), f"swap {i}", [b.train[8], b.train[9]], "mallory"), "mallory",
                  chosen=b.train[8])
    store.add(ask(store, png(20), "bigger", [b.train[1]], "bob"), "bob", none_of_these=True)

    result = _materialise([feedback_triplets, feedback_suite], instance, artifacts)
    assert result.success
    (check,) = result.get_asset_check_evaluations()
    assert check.passed and check.metadata["rows"].value == 4
    meta = result.asset_materializations_for_node("feedback_triplets")[0].metadata
    assert {k: meta[k].value for k in ("events", "accepted", "leak", "over_cap", "none_of_these", "duplicate")} == {
        "events": 8, "accepted": 4, "leak": 2, "over_cap": 1, "none_of_these": 1, "duplicate": 0}
    assert meta["cap_per_token"].value == 2 and meta["most_from_one_token"].value == 2
    record = meta["record"].value
    folder = Path(record["folder"])
    assert folder == artifacts / "feedback_triplets" / D / "versions" / meta["version"].value
    assert json.loads((folder / "checks" / "feedback_suite.json").read_text())["passed"] is True

    fb = read_feedback_tables(folder)
    rows = fb.triplets.set_index("query_id")
    first = rows.loc[f"fb-{picked}-{store.query(picked).token}"]
    assert (first.reference_id, first.target_ids, first.hard_negative_ids) == (q0.reference_id, [target], [wrong])
    assert first.split == "train" and first.modification == q0.modification
    new = rows.loc[f"fb-{fresh}-{store.query(fresh).token}"]
    assert new.reference_id == f"fb-{_md5(new_ref)}" and new.hard_negative_ids == [b.train[3]]
    images = fb.images.set_index("image_id")
    assert Path(images.loc[new.reference_id, "path"]).read_bytes() == new_ref    # a copy inside the version
    assert Path(images.loc[new.reference_id, "path"]).parent == folder / "images"
    assert not any(i in b.test for ids in fb.triplets.target_ids for i in ids)        # no leak
    references = set(fb.triplets.reference_id)
    assert not references & set(b.test) and f"fb-{_md5(b.bytes(b.test[1]))}" not in references
    assert sum(q.endswith(token_identity("mallory")) for q in fb.triplets.query_id) == 2   # the cap per token

    # the chains: the triplet of a benchmark query's content has the oracle's chain, reused, not asked again
    annotations = read_annotations(folder / "annotations.parquet").set_index("query_id")
    benchmark = instance.fetch_materializations(dg.AssetKey("cot_annotations"), limit=1).records[0]
    benchmark_chain = read_annotations(benchmark.asset_materialization.metadata["record"].value["path"]).set_index(
        "query_id").loc[q0.query_id]
    assert annotations.loc[first.name, "status"] == "ok"
    assert annotations.loc[first.name, "conclusion"] == benchmark_chain.conclusion
    assert meta["annotated_this_run"].value == 0 and meta["already_stored"].value == 1
    assert meta["without_chain"].value == meta["unknown_to_annotator"].value == 3   # the oracle knows only the
    # benchmark's own queries
    assert "reasoning" in meta["examples"].value and q0.modification in meta["examples"].value

    # training takes them: the accepted triplets, each counted CIRCOT_FEEDBACK_WEIGHT times (here 1.5)
    from types import SimpleNamespace

    from assets.training import _feedback_inputs
    from model_code.model.recipes import pair_examples

    context = SimpleNamespace(instance=instance, log=SimpleNamespace(info=lambda m: None),
                              resources=SimpleNamespace(artifacts=ArtifactStore(root=str(artifacts))))
    fed, annotation_file, info = _feedback_inputs(context, D, b.bench, tables, tmp_path / "runs", 1.5)
    assert info == {"version": meta["version"].value, "triplets": 4, "weight": 1.5, "person_chains": 0,
                    "teacher_chains": 1}
    weighted = read_tables(fed)
    assert len(weighted.triplets) == 6 and all(q.startswith("fb-") for q in weighted.triplets.query_id)
    examples = pair_examples(weighted.triplets, weighted.images, tables.root, "train",
                             read_annotations(annotation_file))
    mine = next(e for e in examples if e.query_id.startswith(f"fb-{picked}"))
    assert (mine.reference, mine.target, mine.negatives) == (b.paths[q0.reference_id], b.paths[target],
                                                             (b.paths[wrong],))
    assert mine.cot is not None and benchmark_chain.conclusion in mine.cot        # its chain comes along
    assert _feedback_inputs(context, D, b.bench, tables, tmp_path / "runs", 0.0) is None   # weight 0: not trained on
    # a set that passed its check but whose chains are gone: the training fails, saying so, rather than
    # training without the feedback
    kept = (folder / "annotations.parquet").read_bytes()
    (folder / "annotations.parquet").unlink()
    with pytest.raises(dg.Failure, match=f"feedback set {meta['version'].value} .* annotations .* are missing"):
        _feedback_inputs(context, D, b.bench, tables, tmp_path / "runs", 1.5)
    (folder / "annotations.parquet").write_bytes(kept)

    # again with nothing new: the same version, still passed
    again = _materialise([feedback_triplets, feedback_suite], instance, artifacts)
    assert again.asset_materializations_for_node("feedback_triplets")[0].metadata["version"].value == \
        meta["version"].value and again.get_asset_check_evaluations()[0].passed


def test_training_without_feedback_says_why_and_fails_when_the_feedback_cannot_be_read(tables, instance, tmp_path):
    """cir_cot_model's feedback input: no feedback set yet (never materialised, or none accepted by its
    check) is said and trained without; a feedback set that cannot be read fails the training."""
    from types import SimpleNamespace

    from assets.training import _feedback_inputs

    said = []
    log = SimpleNamespace(info=lambda m: said.append(("info", m)), warning=lambda m: said.append(("warning", m)))
    context = SimpleNamespace(instance=instance, log=log,
                              resources=SimpleNamespace(artifacts=ArtifactStore(root=str(tmp_path / "artifacts"))))
    bench = read_tables(tables.folder)

    def inputs():
        return _feedback_inputs(context, D, bench, tables, tmp_path / "runs", 1.0)

    assert inputs() is None                                       # never materialised: no feedback yet
    assert said == [("info", f"{D}: no feedback set yet (feedback_triplets[{D}] never materialised): training on "
                             "the benchmark alone")]
    rejected = tmp_path / "rejected-version"
    (rejected / "checks").mkdir(parents=True)
    (rejected / "checks" / "feedback_suite.json").write_text(json.dumps({"passed": False}))
    instance.report_runless_asset_event(dg.AssetMaterialization("feedback_triplets", partition=D, metadata={
        "record": dg.MetadataValue.json({"folder": str(rejected)})}))
    said.clear()
    assert inputs() is None                                       # none accepted by its check: said, as a warning
    assert [level for level, _ in said] == ["warning"] and "passed its checks (feedback_suite)" in said[0][1]
    instance.report_runless_asset_event(dg.AssetMaterialization("feedback_triplets", partition=D))
    with pytest.raises(dg.Failure, match="carries no record"):   # one that cannot be read: not "no feedback"
        inputs()


def test_nothing_accepted_yet_is_a_valid_empty_version(tables, instance, tmp_path):
    result = _materialise([feedback_triplets, feedback_suite], instance, tmp_path / "artifacts")
    assert result.success and result.get_asset_check_evaluations()[0].passed
    meta = result.asset_materializations_for_node("feedback_triplets")[0].metadata
    assert (meta["events"].value, meta["accepted"].value, meta["dagster/row_count"].value) == (0, 0, 0)
    assert meta["teacher"].value == "none" and "no accepted feedback" in meta["examples"].value
    assert read_feedback_tables(meta["record"].value["folder"]).triplets.empty


class RecordingTeacher:
    """A teacher that writes a chain naming the images it was shown (and keeps what it was asked)."""

    name, prompt_version, default_min_acceptance = "recording", "r-v1", 0.95
    asked: list = []

    def annotate(self, requests):
        RecordingTeacher.asked += [(r, Path(r.reference_path).read_bytes()) for r in requests]
        return [judge(r.query_id, self.name, self.prompt_version,
                      f"<caption>the scene of {Path(r.reference_path).name}</caption><reasoning>apply: "
                      f"{r.modification}</reasoning><conclusion>{r.modification} done</conclusion>") for r in requests]


class RecordingAnnotator(AnnotatorResource):
    def build(self, dataset, raw_root):
        return RecordingTeacher()


def test_a_new_reference_is_shown_to_the_teacher_from_its_file_and_annotated_once(tables, instance, tmp_path):
    b = Benchmark(tables)
    artifacts = tmp_path / "artifacts"
    store = FeedbackStore(artifacts / "feedback" / D, D)
    reference = png(3)
    store.add(ask(store, reference, "make it green", [b.train[2], b.train[3]], "alice"), "alice", chosen=b.train[2])
    RecordingTeacher.asked = []
    result = _materialise([feedback_triplets, feedback_suite], instance, artifacts, RecordingAnnotator())
    assert result.success
    ((request, shown),) = RecordingTeacher.asked
    assert shown == reference and request.target_path == b.paths[b.train[2]]      # the teacher saw its file
    assert Path(request.reference_path).name == f"{_md5(reference)}.png"
    folder = Path(result.asset_materializations_for_node("feedback_triplets")[0].metadata["record"].value["folder"])
    table = read_annotations(folder / "annotations.parquet")
    assert list(table.status) == ["ok"] and f"{_md5(reference)}.png" in table.caption[0]
    RecordingTeacher.asked = []
    again = _materialise([feedback_triplets], instance, artifacts, RecordingAnnotator())
    assert RecordingTeacher.asked == []                                # stored: not annotated twice
    assert again.asset_materializations_for_node("feedback_triplets")[0].metadata["already_stored"].value == 1


def test_the_check_fails_a_version_with_unknown_ids_bad_texts_and_leaks(tables, tmp_path):
    b = Benchmark(tables)
    folder = tmp_path / "artifacts" / "feedback_triplets" / D / "versions" / "bad"
    source = tmp_path / "upload.png"
    source.write_bytes(png(4))
    row = {"dataset": D, "split": "train", "category": None, "subset_ids": [], "shared_concept": None,
           "n_edits": None, "reference_dependent": None, "hard_negative_ids": []}
    write_feedback_tables(folder, [
        {**row, "query_id": "fb-1", "reference_id": b.train[0], "modification": "fine", "target_ids": [b.test[0]]},
        {**row, "query_id": "fb-2", "reference_id": "nowhere", "modification": "  ", "target_ids": [b.train[1]]},
        {**row, "query_id": "fb-3", "reference_id": "fb-" + "0" * 32, "modification": "x" * 1001,
         "target_ids": [b.train[1]], "hard_negative_ids": [b.test[1]]},
        {**row, "query_id": "fb-4", "reference_id": b.test[2], "modification": "ok", "target_ids": [b.train[1]]},
    ], [{"image_id": "fb-" + "0" * 32, "dataset": D, "split": "train", "path": str(source), "category": None}])
    record = {"dataset": D, "folder": str(folder), "version": "bad", "tables_folder": tables.folder,
              "tables_version": tables.version, "root": tables.root, "raw_version": tables.raw_version}

    @dg.asset(name="feedback_triplets", partitions_def=feedback_triplets.partitions_def)
    def constructed() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"record": dg.MetadataValue.json(record)})

    with dg.instance_for_test() as inst:
        result = _materialise([constructed, feedback_suite], inst, tmp_path / "artifacts")
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    found = check.metadata["problems"].value
    assert f"fb-1: target {b.test[0]} is a held-out image" in found
    assert f"fb-3: hard negative {b.test[1]} is a held-out image" in found
    assert f"fb-4: reference {b.test[2]} is a held-out image" in found
    assert "fb-2: reference nowhere is not an image of the gallery" in found and "fb-2: empty modification" in found
    assert "fb-3: modification of 1001 characters" in found
    assert f"image fb-{'0' * 32}: its file's content hash is {_md5(png(4))}" in found
    assert (check.metadata["leak_problems"].value, check.metadata["text_problems"].value,
            check.metadata["id_problems"].value) == (3, 2, 2)
    assert json.loads((folder / "checks" / "feedback_suite.json").read_text())["passed"] is False


def test_online_metrics_per_model_version_beside_the_offline_headline(tables, tmp_path):
    b = Benchmark(tables)
    artifacts = tmp_path / "artifacts"
    store = FeedbackStore(artifacts / "feedback" / D, D)
    shown = b.train[:12]
    answers = [("m1", dict(chosen=shown[0])), ("m1", dict(chosen=shown[11])), ("m1", dict(none_of_these=True)),
               ("m1", dict(chosen=shown[3])), ("m2", dict(chosen=shown[0])), ("m2", dict(chosen=shown[1]))]
    for i, (version, answer) in enumerate(answers):
        store.add(ask(store, png(30 + i), "turn it", shown, f"user{i}", version=version), f"user{i}", **answer)
    with dg.instance_for_test() as inst:
        inst.report_runless_asset_event(dg.AssetMaterialization("evaluation", partition=D, metadata={
            "record": dg.MetadataValue.json({"model_version": "m1", "split": "test", "headline": "R@10",
                                             "metrics": {"cot": {"R@10": 0.5}, "no_cot": {"R@10": 0.4}}})}))
        result = _materialise([online_metrics], inst, artifacts)
    meta = result.asset_materializations_for_node("online_metrics")[0].metadata
    table = meta["table"].value
    assert "| m1 | 4 | 0.250 | 0.500 | 0.250 | R@10 0.500 (test) |" in table
    assert "| m2 | 2 | 0.500 | 1.000 | 0.000 | not evaluated |" in table
    assert meta["latest_model_version"].value == "m2" and meta["pick_at_1"].value == 0.5
    assert meta["online"].value["m1"]["offline"]["value"] == 0.5
    image = pixels(base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)\)", meta["plot"].value).group(1)))
    assert all(drawn(image, c) > 50 for c in ("C0", "C1", "C2")) and drawn(image, (0, 0, 0)) > 20


def _sense(sensor, instance, cursor, artifacts):
    context = dg.build_sensor_context(instance=instance, cursor=cursor,
                                      resources={"artifacts": ArtifactStore(root=str(artifacts))})
    result = sensor(context)
    return (result if isinstance(result, list) else [] if isinstance(result, dg.SkipReason) else [result],
            context.cursor, result)


def test_the_sensor_asks_for_a_feedback_run_once_n_new_triplets_are_accepted_and_not_twice(tables, instance,
                                                                                            tmp_path, monkeypatch):
    from orchestration.definitions import defs
    from orchestration.operations import REASON_TAG, TRIGGER_TAG

    monkeypatch.setenv("CIRCOT_FEEDBACK_RETRAIN_AFTER", "3")
    sensor = next(s for s in defs.get_repository_def().sensor_defs if s.name == "feedback_sensor")
    assert sensor.job_name == "feedback" and sensor.default_status == dg.DefaultSensorStatus.STOPPED
    b = Benchmark(tables)
    artifacts = tmp_path / "artifacts"
    store = FeedbackStore(artifacts / "feedback" / D, D)

    def answer(i, chosen):
        store.add(ask(store, png(40 + i), f"edit {i}", [chosen, b.train[0]], "alice"), "alice", chosen=chosen)

    answer(0, b.train[1])
    answer(1, b.test[0])                      # a leak: never counted
    answer(2, b.train[2])
    requests, cursor, skip = _sense(sensor, instance, None, artifacts)
    assert requests == [] and "2 new accepted feedback triplets of 3" in skip.skip_message
    answer(3, b.train[3])
    (request,), cursor2, _ = _sense(sensor, instance, cursor, artifacts)
    assert request.partition_key == D and request.tags[TRIGGER_TAG] == "feedback"
    assert "3 new accepted feedback triplets" in request.tags[REASON_TAG] and json.loads(cursor2) == {D: 3}
    assert _sense(sensor, instance, cursor2, artifacts)[0] == []          # not twice
    again, _, _ = _sense(sensor, instance, cursor, artifacts)            # a cursor lost: the same run key
    assert [r.run_key for r in again] == [request.run_key]
    # a feedback set built meanwhile (by hand) with those 3: nothing new, even without a cursor
    instance.report_runless_asset_event(dg.AssetMaterialization("feedback_triplets", partition=D,
                                                                metadata={"accepted": 3}))
    assert _sense(sensor, instance, None, artifacts)[0] == []


def test_the_served_gallery_takes_extra_splits_and_refuses_unknown_ones(tables, monkeypatch):
    from assets.gallery_index import GalleryIndexConfig, served_extra_splits

    assert served_extra_splits(GalleryIndexConfig()) == []                      # the default run is unchanged
    monkeypatch.setenv("CIRCOT_GALLERY_EXTRA_SPLITS", "train, val")      # a deployment's setting
    assert served_extra_splits(GalleryIndexConfig()) == ["train", "val"]
    assert served_extra_splits(GalleryIndexConfig(extra_splits=[])) == []      # a run's own config wins
    bench = read_tables(tables.folder)
    default = {g.split for g in _gallery(D, bench, tables.root)}
    assert default == {"test"}                                    # unchanged: the scored split
    with_train = _gallery(D, bench, tables.root, ["train"])
    assert {g.split for g in with_train} == {"test", "train"}
    assert len(with_train) == int(bench.images.split.isin(["test", "train"]).sum())
    assert all(Path(g.path).is_file() for g in with_train)
    with pytest.raises(dg.Failure, match="no such split"):
        _gallery(D, bench, tables.root, ["training"])


def test_the_feedback_job_holds_the_feedback_assets_and_their_check():
    from orchestration.definitions import FEEDBACK_JOB, defs

    job = defs.resolve_job_def(FEEDBACK_JOB)
    assert {k.to_user_string() for k in job.asset_layer.asset_graph.get_all_asset_keys()} >= {
        "feedback_triplets", "online_metrics"}
    assert {k.name for k in job.asset_layer.asset_graph.asset_check_keys} == {"feedback_suite"}
    assert defs.resolve_assets_def("feedback_triplets").group_names_by_key[dg.AssetKey("feedback_triplets")] == \
        "feedback"


def test_the_feedback_store_comes_from_an_object_store_root_new_files_only(tmp_path):
    import uuid

    import fsspec

    from assets.feedback import feedback_store

    root = f"memory://circot-fb-{uuid.uuid4().hex[:8]}"
    service = ArtifactStore(root=root, cache=str(tmp_path / "service"))    # the service's machine
    written = FeedbackStore(service.dir("feedback", D), D)
    qid = ask(written, png(50), "flip", ["a", "b"], "alice")
    written.add(qid, "alice", chosen="a")
    assert service.push(service.dir("feedback", D)) == 3                   # query, image, event
    pipeline = ArtifactStore(root=root, cache=str(tmp_path / "pipeline"))  # the pipeline's machine
    store = feedback_store(pipeline, D)
    assert [e.query_id for e in store.events()] == [qid] and store.query(qid).shown == ["a", "b"]
    # a file already here is not fetched again (they never change); a new one is
    local = store.root / "queries" / f"{qid}.json"
    local.write_text(local.read_text().replace('"flip"', '"FLIP"'))
    other = ask(written, png(51), "turn", ["b"], "bob")
    service.push(written.root / "queries" / f"{other}.json")
    store = feedback_store(pipeline, D)
    assert store.query(qid).modification == "FLIP" and store.query(other).modification == "turn"
    fs, _ = fsspec.core.url_to_fs(root)
    assert fs.exists(root.split("://")[1] + f"/feedback/{D}/queries/{other}.json")


def test_image_hashes_are_cached_and_read_again_when_a_file_changes(tmp_path):
    from model_code.feedback_tables import DigestCache

    image, cache = tmp_path / "a.png", tmp_path / "cache.json"
    image.write_bytes(png(60))
    first = DigestCache(cache)
    assert first(image) == _md5(png(60)) and first(tmp_path / "missing.png") is None
    first.save()
    again = DigestCache(cache)
    assert again(image) == _md5(png(60)) and not again.changed          # from the cache, not read
    image.write_bytes(png(61) + b"more")
    assert again(image) == _md5(png(61) + b"more") and again.changed
