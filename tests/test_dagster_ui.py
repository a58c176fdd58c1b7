"""The Dagster webserver on loopback: the definitions load with every job, schedule and sensor (its
GraphQL API), and the asset graph as a person sees it (a headless-Chromium screenshot)."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.browser import Chromium, free_port
from tests.conftest import REPO

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
    assert {"cir_pipeline", "training", "evaluate_and_promote"} <= {j["name"] for j in repo["jobs"]}
    schedules = {s["name"]: s for s in repo["schedules"]}
    assert schedules["retrain_schedule"]["cronSchedule"] == "0 3 * * 1"
    assert schedules["retrain_schedule"]["scheduleState"]["status"] == "STOPPED"   # nothing runs unasked
    sensors = {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]}
    assert sensors == {"dataset_change_sensor": "STOPPED", "after_data_pipeline": "STOPPED",
                       "after_training": "STOPPED", "failure_alert": "RUNNING"}
    assets = {"/".join(a["assetKey"]["path"]): a["partitionDefinition"] for a in repo["assetNodes"]}
    for name in ("raw_dataset", "triplets", "cot_annotations", "base_model", "cir_cot_model", "evaluation",
                 "promoted_model", "gallery_index", "bento"):
        assert name in assets
    assert assets["evaluation"] is not None and assets["base_model"] is None   # dataset partitions where they belong


def test_the_asset_graph_as_a_person_sees_it(webserver, tmp_path):
    import base64

    browser = Chromium(tmp_path)
    try:
        browser.send("Page.enable")
        browser.send("Page.navigate", url=webserver + "/asset-groups")
        # the global asset graph: the five groups of docs/architecture.md §3 (collapsed at first)
        browser.until("['data', 'annotation', 'model', 'evaluation', 'serving'].every(g => "
                      "document.body.innerText.split('\\n').includes(g))", timeout=120)
        # a fresh instance asks to join the community: skip it, as a person would
        skip = "[...document.querySelectorAll('button')].filter(b => b.textContent.trim() === 'Skip')"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not browser.js(f"{skip}.length"):
            time.sleep(0.5)
        browser.js(f"{skip}.forEach(b => b.click())")
        browser.until(f"{skip}.length === 0")
        time.sleep(2)  # the graph's layout settles
        shot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "dagster-asset-graph.png").write_bytes(shot)
        from PIL import Image

        with Image.open(tmp_path / "dagster-asset-graph.png") as im:   # a whole picture of a page, not a stub
            colors = im.getcolors(1 << 20)          # None: more than a million colours
            assert im.width >= 800 and im.height >= 600 and (colors is None or len(colors) > 50)
    finally:
        browser.close()
