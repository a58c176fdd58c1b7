"""The production Dagster instance of deploy/dagster/ on a real PostgreSQL server (Debian's package,
started here on loopback): the data job's run and its events stored in PostgreSQL, and the daemon,
loading deploy/dagster/workspace.yaml, ticking a sensor into it. Skipped, saying why, where no PostgreSQL
server can be started (.ci/run installs one; with CIRCOT_REQUIRE_POSTGRES=1 it must start)."""

import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, make_dvc_project

PG_ENV = ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB")


def _unavailable(reason: str):
    if os.environ.get("CIRCOT_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"CIRCOT_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)


def _pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return versions[-1] if versions else None


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on loopback in a folder of its own, with a database ``dagster``; its
    connection settings as DAGSTER_PG_* values."""
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if not (initdb and pg_ctl):
        _unavailable("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="circot-pg-"))   # not under pytest's folder: the server's user reads it
    as_server = []
    if os.geteuid() == 0:   # the server refuses to run as root: as the package's user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            _unavailable("running as root, and there is no 'postgres' user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_server = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = root / "data"
    try:
        subprocess.run([*as_server, initdb, "-D", str(data), "-A", "trust", "-U", "circot", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        started = subprocess.run([*as_server, pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t",
                                  "60", "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
                                  "start"], capture_output=True, text=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        shutil.rmtree(root, ignore_errors=True)
        _unavailable(f"the PostgreSQL server could not be initialised: {e}")
    if started.returncode != 0:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        _unavailable(f"the PostgreSQL server did not start: {started.stderr[-500:]} {log[-1000:]}")
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user="circot", dbname="postgres")
    conn.autocommit = True
    conn.cursor().execute("CREATE DATABASE dagster")
    conn.close()
    try:
        yield {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(port), "DAGSTER_PG_USER": "circot",
               "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": "dagster"}
    finally:
        subprocess.run([*as_server, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _sql(pg: dict, query: str) -> list[tuple]:
    import psycopg2

    conn = psycopg2.connect(host=pg["DAGSTER_PG_HOST"], port=int(pg["DAGSTER_PG_PORT"]), user=pg["DAGSTER_PG_USER"],
                            dbname=pg["DAGSTER_PG_DB"])
    try:
        cur = conn.cursor()
        cur.execute(query)
        return cur.fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def production_home(postgres, tmp_path_factory):
    """A DAGSTER_HOME holding deploy/dagster/dagster.yaml as it is shipped."""
    home = tmp_path_factory.mktemp("production-dagster")
    shutil.copy(REPO / "deploy" / "dagster" / "dagster.yaml", home / "dagster.yaml")
    return home


def test_the_data_jobs_run_and_events_are_stored_in_postgresql(postgres, production_home, tmp_path, monkeypatch):
    import dagster as dg
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    from orchestration.definitions import PIPELINE_JOB, build_definitions
    from orchestration.run_log import logger_config

    for name, value in postgres.items():
        monkeypatch.setenv(name, value)
    instance = dg.DagsterInstance.from_config(str(production_home))
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
    assert not instance.telemetry_enabled
    # the classes the daemon and the webserver load (a wrong module path fails only when a run is queued)
    assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
    project = make_dvc_project(tmp_path / "project")
    defs = build_definitions(project_dir=str(project), artifacts_root=str(tmp_path / "artifacts"), dataset_roots={})
    result = defs.resolve_job_def(PIPELINE_JOB).execute_in_process(
        partition_key="synthetic", instance=instance, raise_on_error=False,
        run_config={"loggers": logger_config(False, production_home)})
    assert result.success
    # what the UI and the sensors read, from PostgreSQL itself
    [(status,)] = _sql(postgres, f"SELECT status FROM runs WHERE run_id = '{result.run_id}'")
    assert status == "SUCCESS"
    materialised = {key for (key,) in _sql(postgres, "SELECT DISTINCT asset_key FROM event_logs WHERE "
                                                     "dagster_event_type = 'ASSET_MATERIALIZATION'")}
    assert {json.loads(k)[0] for k in materialised} == {"raw_dataset", "triplets", "cot_annotations"}
    assert instance.get_latest_materialization_event(dg.AssetKey("cot_annotations")) is not None
    # the DEBUG events stayed in the instance (the UI) and in the run's log file, not on the console
    events = _sql(postgres, f"SELECT dagster_event_type FROM event_logs WHERE run_id = '{result.run_id}'")
    assert ("STEP_START",) in events and ("RESOURCE_INIT_SUCCESS",) in events
    assert "STEP_START" in (production_home / "run_logs" / f"{result.run_id}.log").read_text()
    instance.dispose()


def test_the_daemon_loads_the_workspace_and_ticks_a_sensor_into_postgresql(postgres, production_home, tmp_path):
    """`dagster-daemon run -w deploy/dagster/workspace.yaml`: the sensor that runs by default
    (dead_run_sensor) ticks, and the tick is stored in PostgreSQL."""
    env = {**os.environ, **postgres, "DAGSTER_HOME": str(production_home), "CIRCOT_ARTIFACTS": str(tmp_path / "a"),
           "PYTHONPATH": str(REPO)}
    daemon = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w",
                               str(REPO / "deploy" / "dagster" / "workspace.yaml")], env=env, cwd=tmp_path,
                              stdout=open(tmp_path / "daemon.log", "w"), stderr=subprocess.STDOUT)
    ticks = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not ticks:
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            ticks = [body for (body,) in _sql(postgres, "SELECT tick_body FROM job_ticks")
                     if "dead_run_sensor" in body]
            time.sleep(2)
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
    assert ticks, (tmp_path / "daemon.log").read_text()[-3000:]
    tick = json.loads(ticks[0])
    assert tick["status"]["__enum__"] in ("TickStatus.SKIPPED", "TickStatus.STARTED", "TickStatus.SUCCESS"), tick


def test_the_projects_own_instance_turns_telemetry_off_and_keeps_a_users_settings(tmp_path, monkeypatch):
    """`circot` outside make (project_homes) and `make run` / `make dagster-ui` (the Makefile) write
    .dagster/dagster.yaml with telemetry off when it is missing or empty, and leave a user's own alone."""
    import dagster as dg

    from orchestration.__main__ import project_homes

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DAGSTER_HOME")
    monkeypatch.delenv("BENTOML_HOME")
    project_homes()
    home = tmp_path / ".dagster"
    assert os.environ["DAGSTER_HOME"] == str(home)
    assert not dg.DagsterInstance.from_config(str(home)).telemetry_enabled
    own = "telemetry:\n  enabled: true\nrun_monitoring:\n  enabled: true\n"
    (home / "dagster.yaml").write_text(own)
    project_homes()
    assert (home / "dagster.yaml").read_text() == own
    if shutil.which("make"):   # the Makefile's rule, as `make -n run` shows it, run with an empty file
        (home / "dagster.yaml").write_text("")
        dry = subprocess.run(["make", "-s", "-n", "-f", str(REPO / "Makefile"), "run", f"DAGSTER_HOME={home}"],
                             capture_output=True, text=True, timeout=60, cwd=REPO).stdout
        rule = next(line for line in dry.splitlines() if "dagster.yaml" in line)
        subprocess.run(["bash", "-c", rule], check=True, timeout=30)
        assert (home / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n"
