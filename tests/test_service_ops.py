"""The service as an operator runs it: served rankings against the evaluation's, a killed encoder or
reasoner under load and SIGTERM, traffic classes that do not starve each other, /metrics, JSON logs, and a
Bento built by hand and served from the store."""

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
import zlib

import pytest

from tests._serving import Server, error_of, kill, prepare
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
    chain = {s: json.loads(body)["reasoning"][s] or "x" for s in ("caption", "reasoning", "conclusion")}
    assert _search(server, image, "make the star red", k=3, chain=json.dumps(chain),
                   query_id=json.loads(body)["query_id"])[0] == 200   # a corrected search: counted apart
    after = values()
    grew = {name: after[name] - before.get(name, 0.0) for name in after}
    assert grew['circot_queries_total{mode="no_cot",outcome="ok"}'] == 1
    assert grew['circot_queries_total{mode="cot",outcome="ok"}'] == 1
    assert grew['circot_queries_total{mode="no_cot",outcome="bad_request"}'] == 1
    assert grew['circot_query_phase_seconds_count{phase="embedding"}'] == 1
    assert grew['circot_query_phase_seconds_count{phase="reasoning"}'] == 1
    assert grew['circot_queries_total{mode="corrected",outcome="ok"}'] == 1
    assert grew['circot_corrected_searches_total{link="linked"}'] == 1
    assert grew['circot_query_phase_seconds_count{phase="corrected_embedding"}'] == 1
    assert grew['circot_query_phase_seconds_count{phase="index_search"}'] == 3
    assert grew['circot_http_requests_total{method="POST",route="/search",status="200"}'] == 3
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

    def read() -> list[dict]:
        return [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]

    def answered(lines: list[dict]) -> list[dict]:   # the no-CoT searches answered (earlier tests asked others)
        return [line for line in lines if line["logger"] == "circot.access" and line.get("status") == 200
                and line["route"] == "/search" and line.get("mode") == "no_cot"]

    before = len(answered(read()))
    assert _search(server, b"no image", "make the star red")[0] == 400
    assert _search(server, image, "make the star red", mode="no_cot", k=2)[0] == 200
    deadline = time.monotonic() + 10   # a request's line is written once its answer has gone
    while time.monotonic() < deadline and len(answered(read())) == before:
        time.sleep(0.2)
    lines = read()
    start = [line["message"] for line in lines if line["logger"] == "circot.service"]
    assert any("gallery index gallery_synthetic version" in m and f"cir-cot:{version}" in m for m in start), start
    assert any(m.startswith(f"ready: serving synthetic with model cir-cot:{version}") for m in start), start
    requests = [line for line in lines if line["logger"] == "circot.access"]
    refused = [line for line in requests if line.get("status") == 400 and line["route"] == "/search"]
    assert refused and all(line["level"] == "WARNING" and "exception" not in line for line in refused)
    assert "not a readable image" in refused[-1]["message"]
    ok = answered(lines)
    assert len(ok) > before and ok[-1]["method"] == "POST" and ok[-1]["ms"] > 0 and ok[-1]["timings"]["embedding"] > 0
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


def _worker(server, service: str):
    """The one worker process (psutil) of ``service``."""
    workers = server.workers(service)
    assert len(workers) == 1, (service, workers)
    return workers[0]


def _clients(server, image: bytes, modes: list[str], results: list, stop: threading.Event,
             honour_retry_after: bool = False) -> list[threading.Thread]:
    """One thread per mode searching without pause until ``stop`` (``honour_retry_after``: after a 503,
    first waiting its Retry-After); each call appended to ``results`` as (mode, start, seconds, status,
    body, headers); -1 for no answer (the server closed)."""
    def client(mode: str) -> None:
        while not stop.is_set():
            t = time.monotonic()
            try:
                code, body, headers = _search(server, image, "make the star red", mode=mode, k=3)
            except OSError as e:          # the server closed: after SIGTERM
                code, body, headers = -1, repr(e).encode(), {}
            results.append((mode, t, time.monotonic() - t, code, body, headers))
            if honour_retry_after and code == 503 and headers.get("retry-after", "").isdigit():
                stop.wait(int(headers["retry-after"]))

    threads = [threading.Thread(target=client, args=(mode,), daemon=True) for mode in modes]
    for t in threads:
        t.start()
    return threads


def _until_answered_again(s, results, mode: str, killed: float):
    """After a model process was killed at ``killed``: poll /readyz until a ``mode`` call started
    after the kill is answered (at most 90 s). Returns when /readyz first said 503 and what it said
    (None, None if it never did), and when that call started (None if none was answered)."""
    said_at = readyz_error = back_at = None
    while time.monotonic() - killed < 90 and back_at is None:
        code, body = s.request("GET", "/readyz")
        if code == 503 and said_at is None:
            said_at, readyz_error = time.monotonic(), error_of(body)
        back_at = next((t for m, t, _, c, _, _ in list(results) if m == mode and t > killed + 0.5 and c == 200), None)
        time.sleep(0.2)
    return said_at, readyz_error, back_at


def test_a_killed_encoder_under_load_fails_fast_with_the_reason_and_sigterm_stops_the_service(served):
    """The encoder killed (SIGKILL) between calls, then under 8 clients searching without pause (and one
    asking CoT, which the reasoner answers): every failed no-CoT call is a 503 saying why, with
    Retry-After, within seconds, and every CoT call is answered; /readyz says so; BentoML restarts the
    encoder and the service is ready again; then SIGTERM under the same load stops it within seconds.
    The figures in docs/serving.md come from this test (pytest -s prints them)."""
    env, _, image, home = served
    s = Server({**env, "CIRCOT_API_TOKEN": "t0k", "CIRCOT_METRICS_OPEN": "1"}, home / "chaos.log")
    results: list[tuple[str, float, float, int, bytes, dict]] = []
    stop = threading.Event()
    try:
        s.wait()
        assert s.request("GET", "/metrics")[0] == 200   # CIRCOT_METRICS_OPEN=1: no token for the scraper
        # killed between calls: the next call waits in the dead encoder's socket queue until a probe
        # (in the background, at most every 0.5 s) finds it gone
        assert _search(s, image, "make the star red", mode="no_cot", k=3)[0] == 200
        time.sleep(1)
        kill(_worker(s, "circot-encoder"))
        t0 = time.monotonic()
        code, body, headers = _search(s, image, "make the star red", mode="no_cot", k=3)
        idle_failure = time.monotonic() - t0
        assert code == 503 and "the encoder is away" in error_of(body) and headers["retry-after"] == "5", body
        s.wait(timeout=90)
        _clients(s, image, ["no_cot"] * 8 + ["cot"], results, stop)
        time.sleep(3)
        assert [r for r in results if r[3] == 200 and r[0] == "no_cot"], results[:3]
        victim = _worker(s, "circot-encoder")
        ended = len(results)   # the calls that had ended before the kill (results only grows)
        killed = kill(victim)
        said_at, readyz_error, back_at = _until_answered_again(s, results, "no_cot", killed)
        assert said_at is not None and back_at is not None, s.log.read_text()[-3000:]
        assert [p.pid for p in s.workers("circot-encoder")] != [victim.pid]   # BentoML started another
        time.sleep(2)
        terminated = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(timeout=30)
        shutdown = time.monotonic() - terminated
    finally:
        stop.set()
        if s.proc.poll() is None:
            s.proc.kill()
    window = [r for r in results if r[0] == "no_cot" and killed <= r[1] and r[1] + r[2] < terminated]
    failed = [r for r in window if r[3] != 200]
    # the kill came during the work: calls sent before it ended after it, cut off with the reason
    cut_off = [r for r in results[ended:] if r[0] == "no_cot" and r[1] < killed and r[3] != 200]
    explained = [r for r in failed if r[3] == 503 and r[5].get("retry-after") == "5"
                 and re.search(r"not ready: the encoder|encoder is overloaded or restarting", error_of(r[4]))]
    cot = [r for r in results if r[0] == "cot" and r[1] + r[2] < terminated]
    slowest = max(r[2] for r in failed)
    figures = {"requests_in_outage": len(window), "failed": len(failed), "cut_off_by_the_kill": len(cut_off),
               "share_503_with_reason": round(len(explained) / len(failed), 4),
               "slowest_failure_s": round(slowest, 2), "readyz_503_after_s": round(said_at - killed, 2),
               "ready_again_after_s": round(back_at - killed, 1), "sigterm_to_exit_s": round(shutdown, 2),
               "idle_kill_next_call_failed_after_s": round(idle_failure, 2),
               "cot_calls_answered_meanwhile": f"{sum(r[3] == 200 for r in cot)}/{len(cot)}"}
    print("\nkilled encoder under 8 clients:", json.dumps(figures))
    assert failed and len(explained) == len(failed), {e for _, _, _, c, e, _ in failed if c != 503}
    assert all(r[3] == 503 and "encoder" in error_of(r[4]) for r in cut_off), cut_off
    assert cut_off, "no call was in flight when the encoder was killed"
    assert "encoder" in readyz_error and figures["readyz_503_after_s"] < 3
    assert slowest < 5 and idle_failure < 5    # calls fail fast, not when the encoder is back
    assert figures["ready_again_after_s"] < 60 and shutdown < 15
    assert cot and all(r[3] == 200 for r in cot), [(r[3], r[4][:200]) for r in cot if r[3] != 200]
    log = s.log.read_text()
    assert "ERROR circot.link: the encoder is away" in log and "ERROR circot.access: POST /search 503" in log
    assert "WARNING circot.link: front: shutting down (signal 15)" in log


def test_liveness_gives_a_starting_process_longer_and_a_process_that_answers_loading_is_alive():
    """The rule /livez applies (serving.link.silent_links): silence is counted from the link's creation
    until the first answer, against the startup grace; after an answer, against the grace; an answer,
    even "loading", resets it."""
    from serving.link import ModelLink, silent_links

    now = time.monotonic()
    starting = ModelLink(None, "v", 1.0, "encoder")
    starting.silent_since = now - 100             # no answer in 100 s since the service started
    assert silent_links([starting], grace_s=60, startup_s=600) == []
    assert silent_links([starting], grace_s=60, startup_s=90) == [
        "the encoder has not answered for 100 s since the service started (not probed yet)"]
    loading = ModelLink(None, "v", 1.0, "reasoner")

    async def answered_loading():   # what a probe does with the answer "loading" (its recovery loop stopped)
        loading._mark_away("it is loading the model")
        loading._recovery.cancel()

    asyncio.run(answered_loading())
    assert loading.answered and loading.silent_for() == 0 and silent_links([loading], 0, 0) == []
    died = ModelLink(None, "v", 1.0, "encoder")
    died.answered, died.silent_since, died.away = True, now - 70, "it cannot be reached (ClientConnectorError)"
    assert silent_links([died, loading], grace_s=60, startup_s=600) == [
        "the encoder has not answered for 70 s (it cannot be reached (ClientConnectorError))"]


def test_liveness_fails_once_the_encoder_has_not_answered_for_the_grace_and_recovers_with_it(served):
    """The encoder stopped (SIGSTOP: a stuck process, which no arbiter restarts; in a container a dead
    one stays dead the same way): /livez stays 200 within CIRCOT_LIVENESS_GRACE_S, then answers 503, so a
    Kubernetes liveness probe restarts the pod; /readyz names the encoder meanwhile. Resumed (SIGCONT),
    /livez is 200 again."""
    env, _, _, home = served
    s = Server({**env, "CIRCOT_LIVENESS_GRACE_S": "3"}, home / "liveness.log")
    victim = None
    try:
        s.wait()
        assert s.request("GET", "/livez")[0] == 200
        victim = _worker(s, "circot-encoder")
        victim.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        codes = []
        while time.monotonic() - stopped < 30 and (not codes or codes[-1][1] != 503):
            codes.append((time.monotonic() - stopped, s.request("GET", "/livez")[0]))
            time.sleep(0.25)
        failed_after = codes[-1][0]
        assert codes[-1][1] == 503, codes
        assert all(code == 200 for t, code in codes if t < 2.5), codes   # alive within the grace
        assert 3 <= failed_after < 10, codes
        code, body = s.request("GET", "/readyz")
        assert code == 503 and "the encoder is away" in error_of(body), body
        victim.send_signal(signal.SIGCONT)
        victim = None
        s.wait(200, "/livez", timeout=30)
        s.wait(timeout=30)
    finally:
        if victim is not None:
            victim.send_signal(signal.SIGCONT)
        s.stop()
    assert "ERROR circot.service: not alive: the encoder has not answered for" in s.log.read_text()


def test_a_killed_reasoner_fails_cot_calls_with_the_reason_while_no_cot_calls_are_answered(served):
    """The reasoner killed (SIGKILL) while CoT and no-CoT clients search without pause: the CoT calls cut
    off and those sent while it is away are 503 saying so, with Retry-After, within seconds; /readyz names
    the reasoner; every no-CoT call is answered meanwhile (the encoder is another process); BentoML starts
    the reasoner again and CoT calls are answered again."""
    env, _, image, home = served
    s = Server({**env, "CIRCOT_API_TOKEN": "t0k"}, home / "reasoner-chaos.log")
    results: list[tuple[str, float, float, int, bytes, dict]] = []
    stop = threading.Event()
    try:
        s.wait()
        _clients(s, image, ["cot"] * 3 + ["no_cot"] * 3, results, stop)
        deadline = time.monotonic() + 60
        while {r[0] for r in results if r[3] == 200} != {"cot", "no_cot"} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert {r[0] for r in results if r[3] == 200} == {"cot", "no_cot"}, results[:3]
        time.sleep(1)
        victim = _worker(s, "circot-reasoner")
        ended = len(results)   # the calls that had ended before the kill (results only grows)
        killed = kill(victim)
        said_at, readyz_error, back_at = _until_answered_again(s, results, "cot", killed)
        said = None if said_at is None else (said_at - killed, readyz_error)
        assert said is not None and back_at is not None, s.log.read_text()[-3000:]
        assert [p.pid for p in s.workers("circot-reasoner")] != [victim.pid]
        time.sleep(1)
    finally:
        stop.set()
        s.stop()
    cot = [r for r in results if r[0] == "cot" and r[1] + r[2] >= killed and r[1] <= back_at]
    failed = [r for r in cot if r[3] != 200]
    cut_off = [r for r in results[ended:] if r[0] == "cot" and r[1] < killed and r[3] != 200]
    no_cot = [r for r in results if r[0] == "no_cot" and r[1] + r[2] >= killed and r[1] <= back_at]
    print("\nkilled reasoner:", json.dumps({
        "cot_calls_in_outage": len(cot), "failed": len(failed), "cut_off_by_the_kill": len(cut_off),
        "readyz_503_after_s": round(said[0], 2), "cot_again_after_s": round(back_at - killed, 1),
        "no_cot_answered": f"{sum(r[3] == 200 for r in no_cot)}/{len(no_cot)}"}))
    assert failed and cut_off, "no CoT call was in flight when the reasoner was killed"
    assert all(r[3] == 503 and r[5].get("retry-after") == "5"
               and re.search(r"not ready: the reasoner|reasoner is overloaded or restarting", error_of(r[4]))
               for r in failed), {(r[3], r[4][:200]) for r in failed}
    # calls fail fast: within seconds of the kill (cut off) or of being sent (while away)
    assert max(r[1] + r[2] - max(r[1], killed) for r in failed) < 5
    assert said[0] < 3 and "the reasoner is away" in said[1], said
    assert len(no_cot) > 10 and all(r[3] == 200 for r in no_cot), {(r[3], r[4][:200]) for r in no_cot if r[3] != 200}
    log = s.log.read_text()
    assert "ERROR circot.link: the reasoner is away" in log and "WARNING circot.link: the reasoner is back" in log
    assert "ERROR circot.link: the encoder is away" not in log   # the encoder was never lost


def test_a_full_cot_queue_refuses_cot_calls_at_once_while_no_cot_calls_are_answered_quickly(served):
    """Admission per traffic class (serving/traffic.py): with room for 2 CoT calls, 6 CoT clients (each
    waiting the Retry-After it is given) get answers and, beyond the 2, an immediate 503 naming the CoT
    queue, with a Retry-After of about how long a CoT call takes; 2 no-CoT clients searching meanwhile
    are all answered, within a second (their calls go to the encoder, apart from the CoT batches);
    /metrics counts the refusals of the CoT class and none of the embedding class."""
    env, _, image, home = served
    s = Server({**env, "CIRCOT_API_TOKEN": "t0k", "CIRCOT_COT_QUEUE": "2"}, home / "classes.log")
    results: list[tuple[str, float, float, int, bytes, dict]] = []
    stop = threading.Event()
    try:
        s.wait(200, "/livez")   # then calls only, no /readyz: the calls bring the ready gauge and log line
        deadline = time.monotonic() + 120
        while _search(s, image, "make the star red", mode="no_cot", k=3)[0] != 200:
            assert time.monotonic() < deadline, s.log.read_text()[-2000:]
            time.sleep(0.5)
        alone = []
        for _ in range(10):   # no-CoT latency with no CoT traffic
            t = time.monotonic()
            assert _search(s, image, "make the star red", mode="no_cot", k=3)[0] == 200
            alone.append(time.monotonic() - t)
        threads = _clients(s, image, ["cot"] * 6 + ["no_cot"] * 2, results, stop, honour_retry_after=True)
        time.sleep(15)
        stop.set()
        for t in threads:
            t.join(60)
        values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                  for line in s.call("GET", "/metrics", headers=TOKEN)[1].decode().splitlines()
                  if line and not line.startswith("#")}
    finally:
        stop.set()
        s.stop()
    cot = [r for r in results if r[0] == "cot"]
    refused = [r for r in cot if r[3] == 503]
    answered = sorted(r[2] for r in cot if r[3] == 200)
    no_cot = sorted(r[2] for r in results if r[0] == "no_cot")
    p95 = no_cot[int(0.95 * (len(no_cot) - 1))]
    print("\ntraffic classes:", json.dumps({
        "cot_calls": len(cot), "cot_answered": len(answered), "cot_refused": len(refused),
        "cot_answer_s": [round(answered[0], 2), round(answered[-1], 2)] if answered else None,
        "refusal_p50_s": round(sorted(r[2] for r in refused)[len(refused) // 2], 3) if refused else None,
        "retry_after_s": sorted({int(r[5].get("retry-after", 0)) for r in refused}), "no_cot_calls": len(no_cot),
        "no_cot_p95_s": round(p95, 3), "no_cot_alone_p50_s": round(sorted(alone)[5], 3)}))
    assert {r[3] for r in cot} == {200, 503} and len(answered) >= 4, [r[3] for r in cot]
    for r in refused:
        message = error_of(r[4])
        assert message.startswith("the CoT queue is full: 2 calls of this kind") and "CIRCOT_COT_QUEUE" in message
        assert r[5]["retry-after"].isdigit() and f"in {r[5]['retry-after']} s" in message
        # about how long a CoT call holds its place (at first 5 s, then a moving average of the answers)
        assert 1 <= int(r[5]["retry-after"]) <= max(answered[-1], 5) + 1, (r[5]["retry-after"], answered)
    # refused at once, not after waiting in a queue
    assert sorted(r[2] for r in refused)[len(refused) // 2] < min(0.5, answered[0]), [r[2] for r in refused]
    assert len(no_cot) > 20 and all(r[3] == 200 for r in results if r[0] == "no_cot")
    assert p95 < 1.0, no_cot[-5:]
    assert values['circot_queue_refused_total{class="cot"}'] == len(refused)
    assert values.get('circot_queue_refused_total{class="embedding"}', 0) == 0
    assert values['circot_queue_limit{class="cot"}'] == 2 and values['circot_queue_calls{class="cot"}'] == 0
    assert values['circot_ready{dataset="synthetic"}'] == 1   # no /readyz was asked
    assert "INFO circot.service: ready: serving" in s.log.read_text()


def test_a_bento_built_by_hand_holds_the_model_and_serves_its_dataset_from_the_store(served, tmp_path):
    """`bentoml build` from bentofile.yaml (the bento asset's command) for cirr: the Bento lists the
    production model and its export (the deployment asset's) carries it; `bentoml import` of the export into
    an empty store, then `bentoml serve circot:cirr-<version>` from that store answers /search without a
    dataset with cirr, and says so."""
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
               "from pathlib import Path\n"
               "from assets.deployment import export\n"
               "b = bentoml.bentos.get(sys.argv[1])\n"
               "path = export(sys.argv[1], Path(sys.argv[2]))\n"
               "names = tarfile.open(path).getnames()\n"
               "print(json.dumps({'models': [str(m.tag) for m in b.info.all_models], 'labels': b.info.labels,\n"
               "                  'files': [n for n in names if '/models/' in '/' + n.lstrip('./')]}))\n")
    out = subprocess.run([sys.executable, "-c", inspect, f"circot:cirr-{version}", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    bento = json.loads(out.stdout.strip().splitlines()[-1])
    assert bento["models"] == [f"cir-cot:{version}"] and bento["labels"]["dataset"] == "cirr"
    assert any(f.endswith(f"models/cir-cot/{version}/model/circot.json") for f in bento["files"]), bento["files"]
    exported = tmp_path / f"circot-cirr-{version}.bento"
    imported = {**env, "BENTOML_HOME": str(tmp_path / "imported-store")}   # a store with nothing but the import
    out = subprocess.run([sys.executable, "-m", "bentoml", "import", str(exported)], env=imported,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "imported-store" / "bentos" / "circot" / f"cirr-{version}").is_dir()
    # the Bento's own code (not the checkout's) and the store it was imported into
    served_env = {k: v for k, v in imported.items() if k != "PYTHONPATH"}
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
