"""The schedule, the sensors and the failure alert, evaluated with Dagster's test helpers on an
instance in a temporary folder (issue 14)."""

import datetime as dt
import http.server
import json
import threading

import dagster as dg
import pytest

from assets.resources import DatasetRoots, DvcResource, TrainingResource
from model_code.settings import DEFAULT_CRON
from orchestration import operations
from orchestration.definitions import defs


def _by_name(name):
    repo = defs.get_repository_def()
    return next(d for d in [*repo.schedule_defs, *repo.sensor_defs] if d.name == name)


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as inst:
        yield inst


def test_the_definitions_hold_the_schedule_and_sensors_shipped_stopped_but_the_alert():
    repo = defs.get_repository_def()
    assert {s.name for s in repo.schedule_defs} == {"retrain_schedule"}
    assert {s.name for s in repo.sensor_defs} == {"dataset_change_sensor", "after_data_pipeline", "after_training",
                                                  "feedback_sensor", "after_feedback", "failure_alert",
                                                  "dead_run_sensor"}
    assert _by_name("retrain_schedule").default_status == dg.DefaultScheduleStatus.STOPPED
    assert _by_name("retrain_schedule").cron_schedule == DEFAULT_CRON
    for name in ("dataset_change_sensor", "after_data_pipeline", "after_training", "feedback_sensor",
                 "after_feedback"):
        assert _by_name(name).default_status == dg.DefaultSensorStatus.STOPPED
    assert _by_name("failure_alert").default_status == dg.DefaultSensorStatus.RUNNING
    assert _by_name("dead_run_sensor").default_status == dg.DefaultSensorStatus.RUNNING


def _annotated(instance, *datasets):
    for dataset in datasets:
        instance.report_runless_asset_event(dg.AssetMaterialization("cot_annotations", partition=dataset))


def _tick(schedule, instance, when, training=None):
    """One evaluation of the schedule, its context closed after it (a context with resources opens an
    instance of its own, which must not outlive the tick)."""
    training = training or TrainingResource(profile="micro", base_model_path="/models/micro")
    with dg.build_schedule_context(instance=instance, scheduled_execution_time=when,
                                   resources={"training": training}) as context:
        return schedule(context)


def test_the_schedule_retrains_each_training_dataset_with_its_reason_and_never_twice_at_once(instance):
    schedule = _by_name("retrain_schedule")
    when = dt.datetime(2026, 11, 30, 3, 0, tzinfo=dt.timezone.utc)
    skipped = _tick(schedule, instance, when)
    assert isinstance(skipped, dg.SkipReason) and "no training dataset has checked chains" in skipped.skip_message
    _annotated(instance, "synthetic", "cirr", "circo")          # circo has no train split: never trained
    # the embedded profile cannot train cirr: a run would only fail, so none is asked for
    (only,) = _tick(schedule, instance, when, TrainingResource(profile="embedded"))
    assert only.partition_key == "synthetic"
    requests = _tick(schedule, instance, when)
    assert [(r.partition_key, r.run_key) for r in requests] == [
        ("synthetic", f"retrain-synthetic-{when.isoformat()}"), ("cirr", f"retrain-cirr-{when.isoformat()}")]
    assert all(r.tags[operations.TRIGGER_TAG] == "schedule" and "scheduled retraining of" in
               r.tags[operations.REASON_TAG] for r in requests)
    instance.add_run(dg.DagsterRun(job_name="training", run_id="a" * 36, status=dg.DagsterRunStatus.STARTED,
                                   tags={"dagster/partition": "synthetic"}))
    (request,) = _tick(schedule, instance, when)
    assert request.partition_key == "cirr"                       # synthetic's run is still in progress
    instance.add_run(dg.DagsterRun(job_name="training", run_id="b" * 36, status=dg.DagsterRunStatus.STARTED,
                                   tags={"dagster/partition": "cirr"}))
    skipped = _tick(schedule, instance, when)
    assert isinstance(skipped, dg.SkipReason) and "still in progress" in skipped.skip_message


def test_a_finished_training_evaluates_its_dataset_and_those_evaluated_zero_shot_with_it(instance):
    sensor = _by_name("after_training")
    for dataset in ("synthetic", "cirr", "circo"):
        instance.report_runless_asset_event(dg.AssetMaterialization("triplets", partition=dataset))
    expected = {"cirr": ["cirr", "circo"], "synthetic": ["synthetic"], "fashioniq": []}   # zero-shot source: cirr
    for trained, evaluated in expected.items():
        run = dg.DagsterRun(job_name="training", run_id=f"{trained:0<36}"[:36], status=dg.DagsterRunStatus.SUCCESS,
                            tags={"dagster/partition": trained})
        instance.add_run(run)
        event = dg.DagsterEvent(event_type_value="PIPELINE_SUCCESS", job_name="training")
        result = sensor(dg.build_run_status_sensor_context(sensor_name="after_training", dagster_event=event,
                                                            dagster_instance=instance, dagster_run=run))
        if evaluated:
            assert [r.partition_key for r in result] == evaluated
            assert all(f"new model of {trained}" in r.tags[operations.REASON_TAG] for r in result)
        else:   # fashioniq's tables were never built: nothing to evaluate yet
            assert isinstance(result, dg.SkipReason) and "fashioniq" in result.skip_message


def _lock(project, md5):
    (project / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  synthetic:\n    cmd: python -m model_code.synthetic\n    outs:\n"
        f"    - path: data/raw/synthetic\n      hash: md5\n      md5: {md5}.dir\n")


def _evaluate(sensor, instance, cursor, roots, project):
    context = dg.build_sensor_context(instance=instance, cursor=cursor,
                                      resources={"datasets": roots, "dvc": DvcResource(project_dir=str(project))})
    result = sensor(context)
    requests = result if isinstance(result, list) else ([] if isinstance(result, dg.SkipReason) else [result])
    return requests, context.cursor


def test_the_data_sensor_runs_only_the_partition_that_changed_and_only_once(instance, tmp_path):
    sensor = _by_name("dataset_change_sensor")
    project, cirr = tmp_path / "project", tmp_path / "cirr"
    project.mkdir()
    (cirr / "dev").mkdir(parents=True)
    (cirr / "dev" / "a.png").write_bytes(b"x")
    _lock(project, "1111")
    roots = DatasetRoots(roots={"cirr": str(cirr), "fashioniq": str(tmp_path / "nowhere")})   # fashioniq: unreadable

    # first sight: both partitions were never materialised, so both run; the unreadable one is skipped
    requests, cursor = _evaluate(sensor, instance, None, roots, project)
    assert sorted(r.partition_key for r in requests) == ["cirr", "synthetic"]
    assert all(r.tags[operations.TRIGGER_TAG] == "data-change" for r in requests)

    # nothing changed: no run at all
    again, cursor2 = _evaluate(sensor, instance, cursor, roots, project)
    assert again == [] and json.loads(cursor2) == json.loads(cursor)

    # a new gallery image under CIRCOT_CIRR_ROOT: cirr alone
    (cirr / "dev" / "b.png").write_bytes(b"y")
    requests, cursor = _evaluate(sensor, instance, cursor2, roots, project)
    assert [r.partition_key for r in requests] == ["cirr"] and requests[0].run_key.startswith("cirr:files:")

    # a new DVC hash of data/raw/synthetic: synthetic alone
    _lock(project, "2222")
    requests, cursor = _evaluate(sensor, instance, cursor, roots, project)
    assert [(r.partition_key, r.run_key) for r in requests] == [("synthetic", "synthetic:2222.dir")]
    assert _evaluate(sensor, instance, cursor, roots, project)[0] == []


def test_a_partition_already_materialised_is_watched_from_its_current_version(instance, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    _lock(project, "1111")
    instance.report_runless_asset_event(dg.AssetMaterialization("raw_dataset", partition="synthetic"))
    requests, cursor = _evaluate(_by_name("dataset_change_sensor"), instance, None, DatasetRoots(), project)
    assert requests == [] and json.loads(cursor) == {"synthetic": "1111.dir"}


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Receiver.received.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Receiver.received = []
    monkeypatch.setenv("CIRCOT_ALERT_WEBHOOK", f"http://127.0.0.1:{server.server_port}/hook")
    monkeypatch.setenv("CIRCOT_DAGSTER_URL", "http://dagster.example:3000")
    yield _Receiver.received
    server.shutdown()


def _failed_run(instance, defs_):
    job = defs_.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE)
    return dg.build_run_status_sensor_context(sensor_name="failure_alert", dagster_instance=instance,
                                              dagster_run=result.dagster_run, dagster_event=failure).for_run_failure()


def test_a_failed_run_is_posted_to_the_webhook_with_its_step_error_and_link(instance, webhook):
    @dg.asset
    def broken():
        raise RuntimeError("the annotations file is malformed at row 7")

    _by_name("failure_alert")(_failed_run(instance, dg.Definitions(assets=[broken])))
    (kind, message), = webhook
    assert kind == "application/json"
    assert message["kind"] == "failure" and message["failed_step"] == "broken"
    assert "malformed at row 7" in message["error"]
    assert message["run_url"] == f"http://dagster.example:3000/runs/{message['run_id']}"


def test_a_blocked_promotion_gate_is_reported_as_such_with_its_verdict(instance, webhook):
    @dg.asset
    def evaluation():
        return 1

    @dg.asset_check(asset=evaluation, blocking=True)
    def promotion_gate():
        return dg.AssetCheckResult(passed=False, metadata={
            "verdict": dg.MetadataValue.md("R@10 0.018 < floor 0.10: FAILED\nCoT >= no-CoT: FAILED"),
            "model_version": "abc123"})

    @dg.asset(deps=[evaluation])
    def promoted_model():
        return 2

    _by_name("failure_alert")(_failed_run(instance, dg.Definitions(assets=[evaluation, promoted_model],
                                                                    asset_checks=[promotion_gate])))
    (_, message), = webhook
    assert message["kind"] == "promotion_blocked" and "abc123" in message["error"]
    assert message["verdict"] == ["R@10 0.018 < floor 0.10: FAILED", "CoT >= no-CoT: FAILED"]


def test_without_a_webhook_the_alert_is_logged(monkeypatch):
    monkeypatch.delenv("CIRCOT_ALERT_WEBHOOK", raising=False)

    class Log:
        lines = []

        def warning(self, text):
            self.lines.append(text)

    log = Log()
    assert operations.send_alert({"job": "training", "error": "boom"}, log) is False
    assert "CIRCOT_ALERT_WEBHOOK" in log.lines[0] and '"error": "boom"' in log.lines[0]


def test_the_kubernetes_training_pod_is_built_from_configuration():
    from assets.resources import TrainingResource
    from model_code.model.recipes import launch_command

    command = launch_command(["/artifacts/triplets/synthetic/versions/v1"], ["/artifacts/ann.parquet"], "/models/qwen",
                             "/artifacts/cir_cot_model/runs/k/profile.json", "/artifacts/cir_cot_model/runs/k",
                             processes=8, python="python")
    assert command[:7] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8", "-m"]
    assert command[-1] == "--pipes"
    training = TrainingResource(profile="gpu", launcher="kubernetes", k8s_image="registry.example/circot:1",
                                k8s_gpus=8, k8s_artifacts_volume="circot-artifacts")
    spec = training.pod_spec(command, "/artifacts")
    (container,) = spec["containers"]
    assert container["image"] == "registry.example/circot:1" and container["command"] == command
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8" and spec["restartPolicy"] == "Never"
    assert container["volumeMounts"] == [{"name": "artifacts", "mountPath": "/artifacts"}]
    assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "circot-artifacts"
    with pytest.raises(dg.Failure, match="CIRCOT_K8S_IMAGE"):
        TrainingResource(launcher="kubernetes").pod_spec(command, "/artifacts")


KILLED_RUN = """
import sys, time
import dagster as dg
from orchestration.operations import process_tags

@dg.op
def wait_forever():
    time.sleep(600)

@dg.job(name="training")
def training():
    wait_forever()

training.execute_in_process(instance=dg.DagsterInstance.get(),
                            tags={**process_tags(), "dagster/partition": "synthetic"})
"""


def _alert_tick(sensor, instance, cursor=None):
    """One evaluation of a run-status sensor as the daemon makes it: in a named code location and
    repository (a sensor built without them would match runs that have none by accident)."""
    return sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor,
                                                        repository_name="__repository__"))


@pytest.mark.parametrize("marked_by", ["dead-run sensor", "code server"])
def test_a_run_whose_process_was_killed_is_marked_failed_and_alerted_and_the_schedule_goes_on(tmp_path, monkeypatch,
                                                                                              webhook, marked_by):
    """kill -9 of the process executing a run: Dagster would keep it STARTED for good (the schedule
    then skips forever); the dead-run sensor marks it failed (a run the command line started), or the
    code server does with Dagster's generic text (a launched run). Either way the failure alert,
    evaluated as the daemon evaluates it, posts the reason the process died and the step it was in."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from dagster._utils import get_run_crash_explanation

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN], env=env, cwd=str(operations.Path(__file__).parents[1]))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        try:
            deadline = time.time() + 120
            while not instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
                assert child.poll() is None and time.time() < deadline, "the run never started"
                time.sleep(0.5)
            run, = instance.get_runs()
            while not instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START):
                assert time.time() < deadline, "the step never started"
                time.sleep(0.2)
            assert operations.fail_dead_runs(instance) == []          # alive: left alone
            alert = _by_name("failure_alert")
            cursor = _alert_tick(alert, instance).cursor               # the daemon's first tick: from now on
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert child.returncode == -signal.SIGKILL                      # killed while the step was running
        schedule = _by_name("retrain_schedule")
        when = dt.datetime(2026, 11, 30, 3, 0, tzinfo=dt.timezone.utc)
        _annotated(instance, "synthetic")
        skipped = _tick(schedule, instance, when)
        assert isinstance(skipped, dg.SkipReason) and run.run_id in skipped.skip_message   # the bug this fixes

        if marked_by == "code server":     # what Dagster's code server does when a launched run's process dies
            instance.report_engine_event(get_run_crash_explanation(f"Run execution process for {run.run_id}",
                                                                   -signal.SIGKILL), run)
            instance.report_run_failed(run)
            reason = "was terminated by signal 9 (SIGKILL)"
        else:
            result = _by_name("dead_run_sensor")(dg.build_sensor_context(instance=instance))
            assert isinstance(result, dg.SkipReason) and run.run_id in result.skip_message
            reason = f"(pid {child.pid}) is gone"
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        assert operations.fail_dead_runs(instance) == []          # once only
        assert not webhook
        _alert_tick(alert, instance, cursor)
        (_, message), = webhook
        assert reason in message["error"] and operations.GENERIC_FAILURE not in message["error"]
        assert (message["kind"], message["partition"], message["failed_step"]) == ("failure", "synthetic",
                                                                                   "wait_forever")
        (request,) = _tick(schedule, instance, when)
        assert request.partition_key == "synthetic"                # the schedule goes on


def test_a_successful_feedback_run_of_a_training_dataset_retrains(instance):
    sensor = _by_name("after_feedback")
    for dataset, expect_run in (("synthetic", True), ("cirr", True), ("circo", False)):
        run = dg.DagsterRun(job_name="feedback", run_id=f"{dataset:0<36}"[:36], status=dg.DagsterRunStatus.SUCCESS,
                            tags={"dagster/partition": dataset})
        instance.add_run(run)
        event = dg.DagsterEvent(event_type_value="PIPELINE_SUCCESS", job_name="feedback")
        context = dg.build_run_status_sensor_context(sensor_name="after_feedback", dagster_event=event,
                                                     dagster_instance=instance, dagster_run=run)
        result = sensor(context)
        if expect_run:
            assert isinstance(result, dg.RunRequest) and result.run_key == f"train-after-{run.run_id}"
            assert result.partition_key == dataset
            assert result.tags[operations.TRIGGER_TAG] == "feedback"
        else:
            assert isinstance(result, dg.SkipReason) and "not a training dataset" in result.skip_message
