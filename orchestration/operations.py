"""How the system runs by itself: a retraining schedule, a data-change sensor, the sensors that chain
the jobs, and failure alerts. All are Dagster's own idioms, shipped stopped except the alerts, so a
fresh ``dagster dev`` does nothing unasked (turn them on in the UI: Automation).

- ``retrain_schedule`` (cron ``CIRCOT_RETRAIN_CRON``, default weekly, Monday 03:00): runs the
  ``training`` job for each training dataset that has checked chains (one run per partition), tagged
  with why; a partition whose training run is still queued or running is skipped, so overlapping
  ticks never train it twice at once. Unchanged inputs reuse what exists (the training
  assets key their runs by their inputs).
- ``dataset_change_sensor``: notices a new version of a dataset partition (the DVC hash of
  ``data/raw/synthetic`` in ``dvc.lock``; for a real dataset its ``<root>.dvc`` hash, else a
  fingerprint of the files under ``CIRCOT_<D>_ROOT``: names, sizes, modification times) and runs
  ``cir_pipeline`` for that partition only. Its cursor holds each partition's last fingerprint: no
  change, no run; a run key per fingerprint, so nothing is triggered twice. A partition seen for the
  first time runs only if it was never materialised. An unreadable folder is reported and skipped.
- ``after_data_pipeline``: a finished ``cir_pipeline[d]`` retrains ``training[d]`` (``d`` a training
  dataset) or re-evaluates ``d`` (evaluation -> gate -> promoted model -> gallery index -> Bento);
  ``after_training``: a finished ``training[t]`` evaluates every dataset evaluated with ``t``'s model
  (``t`` itself, and zero-shot the benchmarks whose source it is) that has its tables.
- ``feedback_sensor``: counts the feedback triplets each training dataset would accept now
  (``collect_triplets``' report: leakage guard, cap, de-duplication; no annotation) and, once
  ``CIRCOT_FEEDBACK_RETRAIN_AFTER`` new ones have arrived since the last feedback set (its cursor, or
  the newest ``feedback_triplets`` materialisation), runs the ``feedback`` job for that partition,
  tagged with the reason; the run key names the accepted set, so nothing is triggered twice.
- ``dead_run_sensor`` (running): a started run whose process is gone (killed, crashed) is marked
  failed, so that the schedule does not skip forever and the alert fires (``fail_dead_runs``; the
  command line runs it too before it starts a run).
- ``failure_alert``: a failed run posts ``{job, partition, failed_step, error, run_url, kind}`` as JSON
  to ``CIRCOT_ALERT_WEBHOOK`` (logged when unset); a run stopped by the promotion gate is reported
  as ``kind: promotion_blocked`` with the gate's verdict lines, not as a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import urllib.request
from pathlib import Path

import dagster as dg
import yaml

from assets.common import ZERO_SHOT_SOURCE
from assets.resources import ArtifactStore, DatasetRoots, DvcResource, TrainingResource
from model_code.benchmarks import benchmark, model_source, names, training_names
from model_code.data import DataError
from model_code.settings import PipelineSettings, load

ACTIVE = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
          dg.DagsterRunStatus.STARTED)
TRIGGER_TAG = "circot/trigger"
REASON_TAG = "circot/reason"
PID_TAG, HOST_TAG = "circot/pid", "circot/host"   # the process that executes a run in-process (the CLI)


class DatasetUnreadable(Exception):
    """A configured dataset folder that cannot be read (missing, not a folder, no permission)."""


# ---------------------------------------------------------------------------------------------
# dataset versions


def _dvc_out_md5(dvc_file: Path, out_path: str | None = None) -> str | None:

    data = yaml.safe_load(dvc_file.read_text()) or {}
    outs = data.get("outs") or [o for stage in (data.get("stages") or {}).values() for o in stage.get("outs", [])]
    for out in outs:
        if out_path is None or out.get("path") == out_path:
            return out.get("md5")
    return None


def folder_fingerprint(root: Path) -> str:
    """md5 over the relative path, size and modification time of every file under ``root``:
    cheap (no file is read), and it changes when a file is added, removed, replaced or edited."""
    if not root.is_dir():
        raise DatasetUnreadable(f"{root} is not a readable folder")
    h = hashlib.md5()
    try:
        for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                st = p.stat()
                h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError as e:
        raise DatasetUnreadable(f"{root} cannot be read: {e}") from None
    return h.hexdigest()


def pipeline_selection(dataset: str) -> list[dg.AssetKey] | None:
    """What ``cir_pipeline[d]`` materialises for ``dataset``: everything (None) for a benchmark with a
    train split; its raw data and checked tables only for one without (its chains would train nothing:
    it is evaluated zero-shot, so it needs no teacher)."""
    return None if benchmark(dataset).trains else [dg.AssetKey("raw_dataset"), dg.AssetKey("triplets")]


def _raise(error: OSError) -> None:
    raise error


def dataset_fingerprint(dataset: str, roots: DatasetRoots, project_dir: str | os.PathLike) -> str | None:
    """The version of ``dataset`` now: None when it is not configured (nothing to watch)."""
    project = Path(project_dir)
    spec = benchmark(dataset)
    if spec.dvc_out:
        lock = project / "dvc.lock"
        return _dvc_out_md5(lock, spec.dvc_out) if lock.is_file() else None
    value = roots.roots.get(dataset)
    if not value:
        return None
    root = Path(value).expanduser()
    if not root.is_absolute():
        root = project / root
    dvc_file = root.with_name(root.name + ".dvc")
    if dvc_file.is_file():
        md5 = _dvc_out_md5(dvc_file)
        if md5:
            return f"dvc:{md5}"
    return f"files:{folder_fingerprint(root)}"


def _materialised(instance: dg.DagsterInstance, asset: str, partition: str) -> bool:
    return bool(instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records)


def _active_runs(instance: dg.DagsterInstance, job_name: str, partition: str | None = None) -> list:
    tags = {"dagster/partition": partition} if partition else None
    return list(instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=list(ACTIVE), tags=tags),
                                  limit=5))


# ---------------------------------------------------------------------------------------------
# runs whose process died


def process_tags() -> dict[str, str]:
    """Tags naming this process, for a run it executes itself (``python -m orchestration run``)."""

    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def _run_worker(instance: dg.DagsterInstance, run: dg.DagsterRun) -> int | None:
    """The pid of the process executing ``run`` on this host: the CLI's tags, or the run worker that
    Dagster's default launcher started (its "Started process for run" event); None when unknown or
    on another host (a Kubernetes launcher has run monitoring of its own)."""

    if PID_TAG in run.tags:
        return int(run.tags[PID_TAG]) if run.tags.get(HOST_TAG) == socket.gethostname() else None
    for record in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        pid = record.dagster_event.event_specific_data.metadata.get("pid")
        if pid is not None and "Started process for run" in (record.dagster_event.message or ""):
            return int(pid.value)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True    # another user's process: alive
    try:   # a zombie (dead, not yet reaped by its parent) counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def fail_dead_runs(instance: dg.DagsterInstance, log=None) -> list[str]:
    """Mark failed every started run whose process on this host is gone (killed, out of memory, a
    reboot): Dagster would keep it STARTED for good, the retraining schedule would skip forever, and
    no alert would fire. Returns their run ids; each gets a failure event that says why (the
    failure alert then reports it)."""
    dead = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED,
                                                                 dg.DagsterRunStatus.STARTING])):
        pid = _run_worker(instance, run)
        if pid is None or _alive(pid):
            continue
        instance.report_run_failed(run, f"the process executing this run (pid {pid}) is gone: it was killed or "
                                        f"crashed; marked failed so that the schedule and the alerts go on")
        dead.append(run.run_id)
        if log is not None:
            log.warning(f"run {run.run_id} ({run.job_name}): its process {pid} is gone; marked failed")
    return dead


# ---------------------------------------------------------------------------------------------
# the alert


def failure_message(run: dg.DagsterRun, instance: dg.DagsterInstance, step_failures=(), base_url: str | None = None,
                    run_failure=None) -> dict:
    """The alert for a failed run: what failed, where, why, and a link to it in the UI."""
    base_url = (base_url or load(PipelineSettings)[0].dagster_url).rstrip("/")
    message = {"job": run.job_name, "partition": run.tags.get("dagster/partition"), "run_id": run.run_id,
               "run_url": f"{base_url}/runs/{run.run_id}", "kind": "failure", "failed_step": None, "error": None}
    if run_failure is not None:
        message["error"] = (run_failure.message or "")[:2000]
    for event in step_failures:
        message["failed_step"] = event.step_key
        error = getattr(event.event_specific_data, "error", None)
        while error is not None and error.cause is not None:  # Dagster wraps the asset's own exception
            error = error.cause
        message["error"] = (error.message.strip() if error else event.message or "")[:2000]
        break
    if message["failed_step"] is None:     # a run killed mid-step has no step failure: the step it was in
        message["failed_step"] = _unfinished_step(instance, run.run_id)
    if not message["error"] or GENERIC_FAILURE in message["error"]:
        # a launched run whose process died is marked failed by its code server with Dagster's generic
        # text; the reason (the signal or exit code) is in the engine event just before it
        message["error"] = _crash_reason(instance, run.run_id) or message["error"]
    gate = _blocked_gate(instance, run.run_id)
    if gate is not None:
        message.update(kind="promotion_blocked", failed_step=message["failed_step"] or "promotion_gate",
                       error=f"the promotion gate refused model {gate['model_version']}", verdict=gate["verdict"])
    return message


GENERIC_FAILURE = "marked as failed from outside the execution context"
_CRASH = re.compile(r"terminated by signal|exited with code|is gone")


def _crash_reason(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """Why a run's process died, as the run's engine events say it (the code server's "Run execution
    process ... was terminated by signal 9", or the dead-run sensor's text): the newest such, or None."""
    for record in reversed(list(instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT))):
        text = record.dagster_event.message or ""
        if _CRASH.search(text):
            return text[:2000]
    return None


def _unfinished_step(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """The step a run had started and never finished (where a killed run died), or None."""
    t = dg.DagsterEventType
    open_steps: dict[str, None] = {}
    for record in instance.all_logs(run_id, of_type={t.STEP_START, t.STEP_SUCCESS, t.STEP_FAILURE, t.STEP_SKIPPED}):
        event = record.dagster_event
        if event.event_type == t.STEP_START:
            open_steps[event.step_key] = None
        else:
            open_steps.pop(event.step_key, None)
    return next(reversed(open_steps), None)


def _blocked_gate(instance: dg.DagsterInstance, run_id: str) -> dict | None:
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        ev = record.dagster_event.event_specific_data
        if ev.check_name == "promotion_gate" and not ev.passed:
            meta = ev.metadata
            verdict = meta.get("verdict")
            version = meta.get("model_version")
            return {"verdict": (verdict.value if verdict else ev.description or "").strip().splitlines(),
                    "model_version": version.value if version else "?"}
    return None


def send_alert(message: dict, log, url: str | None = None, timeout: float = 10) -> bool:
    """POST ``message`` as JSON to ``url`` (default ``CIRCOT_ALERT_WEBHOOK``); log it when there is
    none or the post fails. True when it was delivered."""

    url = url or load(PipelineSettings)[0].alert_webhook
    text = json.dumps(message)
    if not url:
        log.warning(f"run failed (set CIRCOT_ALERT_WEBHOOK to post this): {text}")
        return False
    request = urllib.request.Request(url, data=text.encode(), headers={"Content-Type": "application/json"},
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            ok = 200 <= response.status < 300
    except OSError as e:
        log.error(f"the alert could not be posted to the webhook ({e}): {text}")
        return False
    if not ok:
        log.error(f"the webhook answered {response.status}: {text}")
    return ok


# ---------------------------------------------------------------------------------------------
# the definitions


def _feedback_baseline(instance: dg.DagsterInstance, dataset: str) -> int:
    """The accepted count of the newest feedback set of ``dataset`` (0 when none was built)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("feedback_triplets"), asset_partitions=[dataset]), limit=1).records
    if not records:
        return 0
    accepted = records[0].asset_materialization.metadata.get("accepted")
    return int(accepted.value) if accepted is not None else 0


def build_automation(pipeline_job, training_job, evaluation_job, *, feedback_job):
    """(schedules, sensors) over the four jobs."""
    cron = load(PipelineSettings)[0].retrain_cron   # an unusable value: the default (runs refuse to start)
    source = ZERO_SHOT_SOURCE
    train_datasets = training_names()

    @dg.schedule(job=training_job, cron_schedule=cron, default_status=dg.DefaultScheduleStatus.STOPPED,
                 description=f"Retrain (cron {cron!r}, CIRCOT_RETRAIN_CRON) each training dataset with checked "
                             "chains; a finished training is then evaluated, gated and promoted, and the gallery "
                             "index and the Bento refreshed")
    def retrain_schedule(context: dg.ScheduleEvaluationContext, training: TrainingResource):
        when = context.scheduled_execution_time
        stamp = when.isoformat() if when else "manual"
        requests, notes = [], []
        for dataset in train_datasets:
            if not _materialised(context.instance, "cot_annotations", dataset):
                continue
            if training.refusal(dataset):   # the configured profile cannot train it: a run would only fail
                notes.append(f"{dataset}: not retrained, the training profile {training.profile!r} cannot train it")
                continue
            running = _active_runs(context.instance, training_job.name, dataset)
            if running:
                notes.append(f"{dataset}: training run {running[0].run_id} is still in progress: not starting "
                             "another")
                continue
            requests.append(dg.RunRequest(
                run_key=f"retrain-{dataset}-{stamp}", partition_key=dataset,
                tags={TRIGGER_TAG: "schedule", REASON_TAG: f"scheduled retraining of {dataset} ({cron}) at {stamp}"}))
        return requests or dg.SkipReason("; ".join(notes) or "no training dataset has checked chains yet")

    @dg.sensor(job=pipeline_job, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED,
               description="A new version of a dataset (DVC hash or its files) runs cir_pipeline for that partition")
    def dataset_change_sensor(context: dg.SensorEvaluationContext, datasets: DatasetRoots, dvc: DvcResource):
        seen = json.loads(context.cursor) if context.cursor else {}
        requests, notes = [], []
        for dataset in names():
            try:
                fingerprint = dataset_fingerprint(dataset, datasets, dvc.project_dir)
            except (DatasetUnreadable, OSError, ValueError) as e:
                context.log.warning(f"{dataset}: skipped, its data cannot be read: {e}")
                notes.append(f"{dataset} unreadable")
                continue
            if fingerprint is None or fingerprint == seen.get(dataset):
                continue
            first = dataset not in seen
            seen[dataset] = fingerprint
            if first and _materialised(context.instance, "raw_dataset", dataset):
                notes.append(f"{dataset}: now watching version {fingerprint}")
                continue
            requests.append(dg.RunRequest(
                run_key=f"{dataset}:{fingerprint}", partition_key=dataset, asset_selection=pipeline_selection(dataset),
                tags={TRIGGER_TAG: "data-change", REASON_TAG: f"{dataset} changed: version {fingerprint}"}))
        context.update_cursor(json.dumps(seen, sort_keys=True))
        if requests:
            return requests
        return dg.SkipReason("; ".join(notes) or "no dataset changed")

    @dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, monitored_jobs=[pipeline_job],
                          request_jobs=[training_job, evaluation_job], default_status=dg.DefaultSensorStatus.STOPPED,
                          description="After cir_pipeline[d]: retrain (a training dataset) or re-evaluate d")
    def after_data_pipeline(context: dg.RunStatusSensorContext):
        run = context.dagster_run
        dataset = run.tags.get("dagster/partition")
        if dataset is None:
            return dg.SkipReason("the run had no partition")
        tags = {TRIGGER_TAG: "data-pipeline", REASON_TAG: f"new {dataset} data (run {run.run_id})"}
        if dataset in train_datasets:
            return dg.RunRequest(run_key=f"train-after-{run.run_id}", job_name=training_job.name,
                                 partition_key=dataset, tags=tags)
        return dg.RunRequest(run_key=f"evaluate-after-{run.run_id}", job_name=evaluation_job.name,
                             partition_key=dataset, tags=tags)

    @dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, monitored_jobs=[training_job],
                          request_job=evaluation_job, default_status=dg.DefaultSensorStatus.STOPPED,
                          description="After training[t]: evaluate, gate and promote on every dataset evaluated with "
                                      "t's model (t itself, and zero-shot the benchmarks whose source t is)")
    def after_training(context: dg.RunStatusSensorContext):
        run = context.dagster_run
        trained = run.tags.get("dagster/partition")
        ready = [d for d in names() if model_source(d, source).name == trained
                 and _materialised(context.instance, "triplets", d)]
        if not ready:
            return dg.SkipReason(f"no dataset evaluated with the model of {trained} has its tables yet")
        return [dg.RunRequest(run_key=f"evaluate-{d}-after-{run.run_id}", partition_key=d,
                              tags={TRIGGER_TAG: "training",
                                    REASON_TAG: f"new model of {trained} from run {run.run_id}"})
                for d in ready]

    @dg.sensor(job=feedback_job, minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.STOPPED,
               description="Once CIRCOT_FEEDBACK_RETRAIN_AFTER new feedback triplets are accepted for a training "
                           "dataset, builds its next feedback set (the feedback job)")
    def feedback_sensor(context: dg.SensorEvaluationContext, artifacts: ArtifactStore):
        from assets.feedback import accepted_feedback

        threshold = load(PipelineSettings)[0].feedback_retrain_after
        seen = json.loads(context.cursor) if context.cursor else {}
        requests, notes = [], []
        for dataset in train_datasets:
            try:
                rows, _ = accepted_feedback(context, artifacts, dataset)
            except (dg.Failure, DataError, OSError) as e:
                notes.append(f"{dataset}: skipped ({getattr(e, 'description', None) or e})")
                continue
            baseline = max(seen.get(dataset, 0), _feedback_baseline(context.instance, dataset))
            new = len(rows) - baseline
            if new < threshold:
                notes.append(f"{dataset}: {max(new, 0)} new accepted feedback triplets of {threshold}")
                continue
            seen[dataset] = len(rows)
            accepted = hashlib.md5("\n".join(sorted(r["query_id"] for r in rows)).encode()).hexdigest()[:16]
            requests.append(dg.RunRequest(
                run_key=f"feedback-{dataset}-{accepted}", partition_key=dataset,
                tags={TRIGGER_TAG: "feedback", REASON_TAG: f"{new} new accepted feedback triplets for {dataset} "
                                                           f"({len(rows)} in all; threshold {threshold})"}))
        context.update_cursor(json.dumps(seen, sort_keys=True))
        return requests or dg.SkipReason("; ".join(notes) or "no training dataset")

    @dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, monitored_jobs=[feedback_job],
                          request_job=training_job, default_status=dg.DefaultSensorStatus.STOPPED,
                          description="After a feedback set of a training dataset passed its check: retrain on it")
    def after_feedback(context: dg.RunStatusSensorContext):
        run = context.dagster_run
        dataset = run.tags.get("dagster/partition")
        if dataset not in train_datasets:
            return dg.SkipReason(f"{dataset} is not a training dataset: its feedback is not trained on")
        return dg.RunRequest(run_key=f"train-after-{run.run_id}", partition_key=dataset, tags={
            TRIGGER_TAG: "feedback", REASON_TAG: f"new accepted feedback for {dataset} (run {run.run_id})"})

    # every run of the instance: those `make run` / `circot run` start in-process have no code location
    # of origin, and a sensor that watches only its own location's runs skips them
    @dg.run_failure_sensor(default_status=dg.DefaultSensorStatus.RUNNING, monitor_all_code_locations=True,
                           minimum_interval_seconds=20,
                           description="Posts a failed run (job, partition, step, error, link) to "
                                       "CIRCOT_ALERT_WEBHOOK; a blocked promotion gate is reported as such")
    def failure_alert(context: dg.RunFailureSensorContext):
        message = failure_message(context.dagster_run, context.instance, context.get_step_failure_events(),
                                  run_failure=context.failure_event)
        send_alert(message, context.log)

    @dg.sensor(minimum_interval_seconds=20, default_status=dg.DefaultSensorStatus.RUNNING,
               description="Marks failed a started run whose process died (killed, crashed), so the schedule "
                           "runs again and the failure alert fires")
    def dead_run_sensor(context: dg.SensorEvaluationContext):
        dead = fail_dead_runs(context.instance, context.log)
        return dg.SkipReason(f"marked failed: {', '.join(dead)}" if dead else "no run lost its process")

    return [retrain_schedule], [dataset_change_sensor, after_data_pipeline, after_training, feedback_sensor,
                                after_feedback, failure_alert, dead_run_sensor]
