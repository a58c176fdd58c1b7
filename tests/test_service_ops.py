"""The service as an operator runs it: served rankings against the evaluation's, a killed encoder under
load and SIGTERM, /metrics, JSON logs, and a Bento built by hand and served from the store."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zlib

import pytest

from tests._serving import Server, error_of, prepare
from tests.conftest import REPO

TOKEN = {"Authorization": "Bearer t0k"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, micro_base, tiny_synthetic):
    """The micro model in production for synthetic and for cirr (the tiny benchmark's test split as the
    gallery of both), and the environment to serve it."""
    home = tmp_path_factory.mktemp("ops")
    env, version, image = prepare(home, micro_base, tiny_synthetic, datasets=("synthetic", "cirr"))
    return env, version, image, home


@pytest.fixture(scope="module")
def server(served):
    """Token set, JSON log lines."""
    env, _, _, home = served
    s = Server({**env, "CIRCOT_API_TOKEN": "t0k", "CIRCOT_LOG_JSON": "1"}, home / "json.log")
    s.wait()
    yield s
    s.stop()


def _search(server, image: bytes, text: str, **fields):
    return server.call("POST", "/search", {"modification": text, **fields}, {"image": ("ref.png", image)},
                       TOKEN, timeout=60)


def test_served_rankings_equal_the_evaluations_on_the_same_queries(server, served):
    """Every test query of the tiny benchmark through /search (no_cot and cot) ranks the gallery as
    the evaluation ranks it: the reference left out, the rest in the same order."""
    from model_code.data import read_dataset
    from model_code.evaluation.evaluate import evaluate
    from model_code.model.cir_cot import CirCoTModel

    _, _, _, home = served
    root = home / "cir-shapes"
    bench = read_dataset("synthetic", root)
    model = CirCoTModel.load(home / "model", device="cpu")
    ev = evaluate(model, bench, root, "synthetic", "test", methods=("no_cot", "cot"), say=lambda _: None)
    test = bench.images[bench.images.split == "test"].set_index("image_id").path
    k = len(test) - 1   # the whole ranking: every gallery image but the reference
    for mode in ("no_cot", "cot"):
        for q in ev.queries.itertuples():
            code, body, _ = _search(server, (root / test[q.reference_id]).read_bytes(), q.modification, k=k, mode=mode)
            assert code == 200, body
            served_ids = [h["image_id"] for h in json.loads(body)["results"]]
            assert json.loads(body)["excluded"] == [q.reference_id]
            assert served_ids == ev.rankings[mode][q.query_id], (mode, q.query_id)


def test_metrics_are_the_services_own_behind_the_token_with_bounded_labels(server, served):
    _, version, image, _ = served
    assert server.request("GET", "/metrics")[0] == 401

    def values() -> dict[str, float]:
        code, body, _ = server.call("GET", "/metrics", headers=TOKEN)
        assert code == 200
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                if line and not line.startswith("#")}

    before = values()
    assert _search(server, image, "make the star red", mode="no_cot", k=3)[0] == 200
    code, body, _ = _search(server, image, "make the star red", mode="cot", k=3)
    assert code == 200
    assert _search(server, image, "  ", mode="no_cot")[0] == 400
    after = values()
    grew = {name: after[name] - before.get(name, 0.0) for name in after}
    assert grew['circot_queries_total{mode="no_cot",outcome="ok"}'] == 1
    assert grew['circot_queries_total{mode="cot",outcome="ok"}'] == 1
    assert grew['circot_queries_total{mode="no_cot",outcome="bad_request"}'] == 1
    assert grew['circot_query_phase_seconds_count{phase="embedding"}'] == 1
    assert grew['circot_query_phase_seconds_count{phase="reasoning"}'] == 1
    assert grew['circot_query_phase_seconds_count{phase="index_search"}'] == 2
    assert grew['circot_http_requests_total{method="POST",route="/search",status="200"}'] == 2
    assert grew["circot_chains_unparsed_total"] == (json.loads(body)["reasoning"]["error"] is not None)
    assert after[f'circot_model_info{{dataset="synthetic",model_version="{version}"}}'] == 1
    assert after['circot_gallery_images{dataset="synthetic"}'] == 48 and after['circot_ready{dataset="synthetic"}'] == 1

    def series_names(body: bytes) -> set[str]:
        return {line.rsplit(" ", 1)[0] for line in body.decode().splitlines() if line and not line.startswith("#")}

    for path in ("/junk/first", "/ui/images/synthetic/nope-first"):   # the label sets a junk URL makes
        server.request("GET", path, headers=TOKEN)
    before = server.call("GET", "/metrics", headers=TOKEN)[1]
    for i in range(150):
        server.request("GET", f"/junk/{i}/{'x' * (i % 40)}", headers=TOKEN)
        server.request("GET", f"/ui/images/synthetic/nope-{i}", headers=TOKEN)
    after = server.call("GET", "/metrics", headers=TOKEN)[1]
    assert series_names(after) == series_names(before) and len(after) < len(before) + 500   # counts change only
    assert "nope-" not in after.decode() and "junk" not in after.decode()


def test_log_lines_are_json_one_per_request_and_a_4xx_is_a_warning_without_a_traceback(server, served):
    _, version, image, _ = served
    assert _search(server, b"no image", "make the star red")[0] == 400
    assert _search(server, image, "make the star red", mode="no_cot", k=2)[0] == 200

    def read() -> list[dict]:
        return [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]

    deadline = time.monotonic() + 10   # a request's line is written once its answer has gone
    while time.monotonic() < deadline and not any(
            line.get("route") == "/search" and line.get("status") == 200 and line.get("timings") for line in read()):
        time.sleep(0.2)
    lines = read()
    start = [line["message"] for line in lines if line["logger"] == "circot.service"]
    assert any("gallery index gallery_synthetic version" in m and f"cir-cot:{version}" in m for m in start), start
    assert any(m.startswith(f"ready: serving synthetic with model cir-cot:{version}") for m in start), start
    requests = [line for line in lines if line["logger"] == "circot.access"]
    refused = [line for line in requests if line.get("status") == 400 and line["route"] == "/search"]
    assert refused and all(line["level"] == "WARNING" and "exception" not in line for line in refused)
    assert "not a readable image" in refused[-1]["message"]
    ok = [line for line in requests if line.get("status") == 200 and line["route"] == "/search"]
    assert ok and ok[-1]["method"] == "POST" and ok[-1]["ms"] > 0 and ok[-1]["timings"]["embedding"] > 0
    assert ok[-1]["mode"] == "no_cot" and ok[-1]["outcome"] == "ok" and ok[-1]["level"] == "INFO"
    assert "Traceback" not in server.log.read_text()


def _huge_png(side: int) -> bytes:
    """A black side x side RGB PNG: megapixels in a few hundred KB (written without decoding anything)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    raw = zlib.compress(b"\0" * ((side * 3 + 1) * side), 9)
    header = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_a_huge_image_is_refused_from_its_header_before_it_is_decoded(server):
    png = _huge_png(6000)
    assert len(png) < 200_000
    t0 = time.monotonic()
    code, body, _ = _search(server, png, "make the star red")
    seconds = time.monotonic() - t0
    assert code == 413 and "6000x6000 pixels; at most 25000000" in error_of(body)
    assert seconds < 1.5, seconds   # decoding 36 M pixels alone takes longer


def _encoder_pid(server) -> int:
    import psutil

    for child in psutil.Process(server.proc.pid).children(recursive=True):
        if "circot-encoder" in " ".join(child.cmdline()):
            return child.pid
    raise AssertionError("no encoder process")


def test_a_killed_encoder_under_load_fails_fast_with_the_reason_and_sigterm_stops_the_service(served):
    """The encoder killed (SIGKILL) between calls, then under 8 clients searching without pause: every
    failed call is a 503 saying why, with Retry-After, within seconds; /readyz says so; BentoML restarts
    the encoder and the service is ready again; then SIGTERM under the same load stops it within seconds.
    The figures in docs/serving.md come from this test (pytest -s prints them)."""
    env, _, image, home = served
    s = Server({**env, "CIRCOT_API_TOKEN": "t0k", "CIRCOT_METRICS_OPEN": "1"}, home / "chaos.log")
    results: list[tuple[float, float, int, bytes, dict]] = []
    stop = threading.Event()
    try:
        s.wait()
        assert s.request("GET", "/metrics")[0] == 200   # CIRCOT_METRICS_OPEN=1: no token for the scraper
        # killed between calls: the next call waits in the dead encoder's socket queue until a probe
        # (in the background, at most every 0.5 s) finds it gone
        assert _search(s, image, "make the star red", mode="no_cot", k=3)[0] == 200
        time.sleep(1)
        os.kill(_encoder_pid(s), signal.SIGKILL)
        t0 = time.monotonic()
        code, body, headers = _search(s, image, "make the star red", mode="no_cot", k=3)
        idle_failure = time.monotonic() - t0
        assert code == 503 and "the encoder is away" in error_of(body) and headers["retry-after"] == "5", body
        s.wait(timeout=90)

        def client() -> None:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    code, body, headers = _search(s, image, "make the star red", mode="no_cot", k=3)
                except OSError as e:          # the server closed: after SIGTERM
                    code, body, headers = -1, repr(e).encode(), {}
                results.append((t, time.monotonic() - t, code, body, headers))

        clients = [threading.Thread(target=client, daemon=True) for _ in range(8)]
        for c in clients:
            c.start()
        time.sleep(3)
        assert [r for r in results if r[2] == 200], results[:3]
        killed = time.monotonic()
        os.kill(_encoder_pid(s), signal.SIGKILL)
        said_at = back_at = None
        while time.monotonic() - killed < 90 and back_at is None:
            code, body = s.request("GET", "/readyz")
            if code == 503 and said_at is None:
                said_at = time.monotonic()
                readyz_error = error_of(body)
            back_at = next((t for t, _, c, _, _ in list(results) if t > killed + 0.5 and c == 200), None)
            time.sleep(0.2)
        assert said_at is not None and back_at is not None, s.log.read_text()[-3000:]
        time.sleep(2)
        terminated = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(timeout=30)
        shutdown = time.monotonic() - terminated
    finally:
        stop.set()
        if s.proc.poll() is None:
            s.proc.kill()
    window = [r for r in results if killed <= r[0] and r[0] + r[1] < terminated]
    failed = [r for r in window if r[2] != 200]
    explained = [r for r in failed if r[2] == 503 and r[4].get("retry-after") == "5"
                 and re.search(r"not ready: the encoder|encoder is overloaded or restarting", error_of(r[3]))]
    slowest = max(r[1] for r in failed)
    figures = {"requests_in_outage": len(window), "failed": len(failed),
               "share_503_with_reason": round(len(explained) / len(failed), 4),
               "slowest_failure_s": round(slowest, 2), "readyz_503_after_s": round(said_at - killed, 2),
               "ready_again_after_s": round(back_at - killed, 1), "sigterm_to_exit_s": round(shutdown, 2),
               "idle_kill_next_call_failed_after_s": round(idle_failure, 2)}
    print("\nkilled encoder under 8 clients:", json.dumps(figures))
    assert failed and len(explained) == len(failed), {e for _, _, c, e, _ in failed if c != 503}
    assert "encoder" in readyz_error and figures["readyz_503_after_s"] < 3
    assert slowest < 5 and idle_failure < 5    # calls fail fast, not when the encoder is back
    assert figures["ready_again_after_s"] < 60 and shutdown < 15
    log = s.log.read_text()
    assert "ERROR circot.link: the encoder is away" in log and "ERROR circot.access: POST /search 503" in log
    assert "WARNING circot.link: front: shutting down (signal 15)" in log


def test_a_bento_built_by_hand_holds_the_model_and_serves_its_dataset_from_the_store(served, tmp_path):
    """`bentoml build` from bentofile.yaml (the bento asset's command) for cirr: the Bento lists the
    production model and its export carries it; `bentoml serve circot:cirr-<version>` from the store answers
    /search without a dataset with cirr, and says so."""
    from assets.bento import build_command

    env, version, image, home = served
    empty = subprocess.run(build_command("cirr", version), cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**env, "BENTOML_HOME": str(tmp_path / "empty-store")})
    assert empty.returncode != 0 and "no model to put in the Bento: no production model of synthetic" in (
        empty.stderr + empty.stdout)
    assert not (tmp_path / "empty-store" / "bentos" / "circot").exists()
    env = {**env, "CIRCOT_SERVE_DATASET": "cirr"}
    out = subprocess.run(build_command("cirr", version), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    inspect = ("import bentoml, json, sys, tarfile\n"
               "b = bentoml.bentos.get(sys.argv[1])\n"
               "path = bentoml.bentos.export_bento(sys.argv[1], sys.argv[2])\n"
               "names = tarfile.open(path).getnames()\n"
               "print(json.dumps({'models': [str(m.tag) for m in b.info.all_models], 'labels': b.info.labels,\n"
               "                  'files': [n for n in names if '/models/' in '/' + n.lstrip('./')]}))\n")
    out = subprocess.run([sys.executable, "-c", inspect, f"circot:cirr-{version}", str(tmp_path / "circot.bento")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    bento = json.loads(out.stdout.strip().splitlines()[-1])
    assert bento["models"] == [f"cir-cot:{version}"] and bento["labels"]["dataset"] == "cirr"
    assert any(f.endswith(f"models/cir-cot/{version}/model/circot.json") for f in bento["files"]), bento["files"]
    served_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}   # the Bento's own code, not the checkout's
    s = Server(served_env, home / "bento.log", target=f"circot:cirr-{version}", cwd=tmp_path)
    try:
        s.wait()
        code, body, headers = s.call("POST", "/search", {"modification": "make the star red", "mode": "no_cot",
                                                         "k": 3}, {"image": ("ref.png", image)})
        assert code == 200 and json.loads(body)["dataset"] == "cirr" and headers["x-circot-dataset"] == "cirr"
        code, body, _ = s.call("POST", "/search", {"modification": "make the star red", "dataset": "synthetic"},
                               {"image": ("ref.png", image)})
        assert code == 404 and "this service serves cirr, not 'synthetic'" in error_of(body)
    finally:
        s.stop()
    assert f'BentoServer from "circot:cirr-{version}"' in (home / "bento.log").read_text()
