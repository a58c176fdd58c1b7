"""The Dagster webserver on loopback: the definitions load with every job, schedule and sensor (its
GraphQL API), and the asset graph as a person sees it (headless Chromium driven by Playwright)."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from tests.conftest import REPO, free_port

QUERY = """{ repositoriesOrError { ... on RepositoryConnection { nodes { name
  jobs { name } schedules { name cronSchedule scheduleState { status } } sensors { name sensorState { status } }
  assetNodes { assetKey { path } partitionDefinition { description } } } } } }"""


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster-ui")
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}
    (home / "dagster.yaml").touch()
    log = open(home / "webserver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dagster_webserver", "-m", "orchestration.definitions",
                             "-h", "127.0.0.1", "-p", str(port)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/server_info", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the webserver did not start: {(home / 'webserver.log').read_text()[-3000:]}")
        time.sleep(1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(url + "/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        body = json.loads(r.read())
    assert "errors" not in body, body
    return body["data"]


def test_the_definitions_load_with_every_job_schedule_and_sensor(webserver):
    repo, = graphql(webserver, QUERY)["repositoriesOrError"]["nodes"]
    assert {"cir_pipeline", "training", "evaluate_and_promote", "feedback"} <= {j["name"] for j in repo["jobs"]}
    schedules = {s["name"]: s for s in repo["schedules"]}
    assert schedules["retrain_schedule"]["cronSchedule"] == "0 3 * * 1"
    assert schedules["retrain_schedule"]["scheduleState"]["status"] == "STOPPED"   # nothing runs unasked
    sensors = {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]}
    assert sensors == {"dataset_change_sensor": "STOPPED", "after_data_pipeline": "STOPPED",
                       "after_training": "STOPPED", "feedback_sensor": "STOPPED", "after_feedback": "STOPPED",
                       "failure_alert": "RUNNING",
                       "dead_run_sensor": "RUNNING"}
    assets = {"/".join(a["assetKey"]["path"]): a["partitionDefinition"] for a in repo["assetNodes"]}
    for name in ("raw_dataset", "triplets", "cot_annotations", "base_model", "cir_cot_model", "evaluation",
                 "promoted_model", "gallery_index", "bento", "feedback_triplets", "online_metrics"):
        assert name in assets
    assert assets["evaluation"] is not None and assets["base_model"] is None   # dataset partitions where they belong


def test_the_asset_graph_as_a_person_sees_it(webserver, page: Page, tmp_path):
    page.goto(webserver + "/asset-groups")
    graph = page.locator("svg foreignObject")   # the graph's nodes, not the sidebar's list of groups
    # the global asset graph: the five groups of docs/architecture.md §3, collapsed at first
    for group in ("data", "annotation", "model", "evaluation", "serving"):
        expect(graph.locator(f'[data-tooltip="{group}"]')).to_be_visible(timeout=120_000)
    expect(graph.get_by_text("gallery_index", exact=True)).to_have_count(0)
    # a fresh instance asks to join the community: skip it, as a person would
    skip = page.get_by_role("button", name="Skip")
    skip.click(timeout=30_000)
    expect(skip).to_have_count(0)
    page.wait_for_timeout(2000)   # the graph's layout settles
    shot = tmp_path / "dagster-asset-graph.png"
    page.screenshot(path=shot)
    with Image.open(shot) as im:   # a whole picture of a page, not a blank one
        colors = im.getcolors(1 << 20)          # None: more than a million colours
        assert im.size == (1280, 1400) and (colors is None or len(colors) > 50)
    # a group opens onto its assets
    graph.locator('[data-tooltip="serving"]').click()
    for asset in ("gallery_index", "bento"):
        expect(graph.get_by_text(asset, exact=True)).to_be_visible(timeout=30_000)
