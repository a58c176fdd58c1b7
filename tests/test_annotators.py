"""Annotators: the oracle on cir-shapes, a local teacher (tiny random Qwen2-VL) and a remote teacher
against a real OpenAI-compatible HTTP server on loopback."""

import base64
import json
import re
import socket
import threading
import time
from dataclasses import replace
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
from PIL import Image

from model_code.annotation.judge import judge
from model_code.annotation.store import annotation_requests
from model_code.annotation.teachers import (
    PROMPT_VERSION,
    LocalTeacher,
    RemoteTeacher,
    TeacherRequestError,
    retry_after_s,
    teacher_messages,
)
from model_code.backbone import build_random_backbone, save_backbone
from model_code.data import read_dataset
from model_code.synthetic import generate
from model_code.synthetic.oracle import OracleAnnotator
from tests._png import pixels

GOOD = "<caption>a red circle</caption><reasoning>the circle turns blue; nothing else changes</reasoning>" \
       "<conclusion>a blue circle</conclusion>"


@pytest.fixture
def requests_(tiny_synthetic):
    bench = read_dataset("synthetic", tiny_synthetic)
    return annotation_requests(bench.triplets, bench.images, tiny_synthetic)


def test_oracle_accepts_everything_and_describes_reference_and_target(tiny_synthetic, requests_):
    oracle = OracleAnnotator(tiny_synthetic)
    rows = oracle.annotate(requests_)
    assert len(rows) == len(requests_) and all(r.ok for r in rows), [r.reject_reason for r in rows if not r.ok]
    queries, graphs = {}, {}
    for split in generate.SPLITS:
        queries.update(
            {q["query_id"]: q for q in json.loads((tiny_synthetic / "captions" / f"cap.{split}.json").read_text())}
        )
        graphs.update(json.loads((tiny_synthetic / "scene_graphs" / f"{split}.json").read_text()))
    for row in rows:
        q = queries[row.query_id]
        ref, target = graphs[q["reference"]]["objects"], graphs[q["target"]]["objects"]
        for o in ref:  # the caption names every reference object, the conclusion every target object
            assert f"{o['size']} {o['color']} {o['shape']}" in row.caption
        for o in target:
            assert f"{o['size']} {o['color']} {o['shape']}" in row.conclusion
        assert len(re.findall(r"\w: (small|large) \w+ (circle|square|triangle|star|hexagon|diamond)\b",
                              row.conclusion)) == len(target)
        for e in q["edits"]:  # each phrase the text used is resolved in the reasoning
            for phrase in e["refers"]:
                assert phrase.lower() in row.reasoning.lower(), (phrase, row.reasoning)
    # deterministic: the same query always gets the same chain
    assert [r.reasoning for r in oracle.annotate(requests_[:5])] == [r.reasoning for r in rows[:5]]


def test_oracle_restates_the_scene_between_edits_and_resolves_relational_phrases(tiny_synthetic, requests_):
    rows = {r.query_id: r for r in OracleAnnotator(tiny_synthetic).annotate(requests_)}
    edits = {q.query_id: q for q in requests_}
    several = [r for r in rows.values() if " and " in edits[r.query_id].modification or ", " in
               edits[r.query_id].modification]
    assert any("Now: " in r.reasoning for r in several)
    relational = [
        r
        for r in rows.values()
        if re.search(r"the (leftmost|rightmost|topmost|highest|lowest|largest|biggest|smallest)", r.reasoning)
    ]
    place = r"(top|middle|bottom|centre)[a-z ]*: (small|large)"
    assert relational and all(re.search(rf"the (leftmost|rightmost|topmost|highest|lowest|largest|biggest|smallest) "
                                        rf"\w+ is {place}", r.reasoning) for r in relational)


def test_judge_rejects_nonsense_leakage_and_a_conclusion_that_repeats_the_caption():
    assert judge("q", "t", "v", GOOD).ok
    cases = {
        "": "empty_answer",
        "lorem ipsum dolor": "missing_section",
        GOOD.replace("nothing else changes", "as the target image shows"): "leakage: target image",
        GOOD.replace("a blue circle", "compared to the second picture, blue"): "leakage: second picture",
        "<caption>a red circle</caption><reasoning>r</reasoning><conclusion>A red circle.</conclusion>":
            "conclusion_repeats_caption",
    }
    for raw, reason in cases.items():
        row = judge("q", "t", "v", raw)
        assert (row.status, row.reject_reason, row.raw) == ("rejected", reason, raw)
    repaired = judge("q", "t", "v", "**Caption:** a\n**Reasoning:** b\n**Conclusion:** c")
    assert repaired.ok and "markdown heading" in repaired.repairs


def test_teacher_prompt_shows_both_images_and_forbids_mentioning_the_target():
    system, user = teacher_messages("make it blue ")
    assert [c["type"] for c in user["content"]] == ["image", "image", "text"]
    text = user["content"][-1]["text"]
    assert '"make it blue"' in text and "never mention" in text and "<caption>" in text
    assert PROMPT_VERSION == "teacher-v1"


@pytest.fixture(scope="module")
def tiny_teacher_path(tmp_path_factory):
    corpus = ["make the red circle blue", "a small green star in the top left corner"] * 50
    model, processor = build_random_backbone("tiny", corpus, vocab_size=400)
    return save_backbone(model, processor, tmp_path_factory.mktemp("teacher") / "tiny-qwen2-vl")


def test_local_teacher_loads_from_a_folder_and_its_nonsense_is_recorded_as_rejected(tiny_teacher_path, requests_):
    teacher = LocalTeacher(tiny_teacher_path, device="cpu", batch_size=2, max_new_tokens=12)
    assert teacher.name == "local:tiny-qwen2-vl" and teacher.prompt_version == PROMPT_VERSION
    rows = teacher.annotate(requests_[:3])
    assert len(rows) == 3 and all(r.status == "rejected" and r.reject_reason for r in rows)
    assert {r.query_id for r in rows} == {r.query_id for r in requests_[:3]}
    assert teacher.stats.requests == 3 and 0 < teacher.stats.new_tokens <= 3 * 12


# ---------------------------------------------------------------------------------------------
# a real OpenAI-compatible server on loopback


class _ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _ChatHandler)
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)   # notified at each request's arrival
        self.gather = 0   # hold each request until this many were in flight at once (0: no hold)
        self.in_flight = self.max_in_flight = 0
        self.calls: dict[str, int] = {}
        self.bodies, self.auth = [], set()


class _ChatHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict | str, headers: dict | None = None):
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        srv: _ChatServer = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            srv.bodies.append(body)
            srv.auth.add(self.headers.get("Authorization"))
            text = body["messages"][-1]["content"][-1]["text"]
            tag = re.search(r"\[(\w+)\]", text).group(1)
            n = srv.calls[tag] = srv.calls.get(tag, 0) + 1
            srv.arrived.notify_all()
            # requests that overlap: held until as many as asked were in flight at once (a client that sends
            # fewer at a time gives up waiting here after 10 s, and the test's count says so)
            srv.arrived.wait_for(lambda: srv.max_in_flight >= srv.gather, timeout=10)
            if tag.startswith("slow") and n == 1:
                # answered only once the client has given up on it and sent it again: past its timeout, however
                # slow or fast the machine (a client that never times out is answered after 30 s, once)
                srv.arrived.wait_for(lambda: srv.calls[tag] >= 2, timeout=30)
        time.sleep(0.05)   # a moment in flight, in which a client sending more than it may would show
        # count the request finished before answering: the client cannot send its next one earlier
        with srv.lock:
            srv.in_flight -= 1
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": "not found"})
        if tag.startswith("rate") and n == 1:
            return self._send(429, {"error": "slow down"}, {"Retry-After": "0"})
        if tag.startswith("later") and n == 1:
            return self._send(503, {"error": "maintenance"}, {"Retry-After": "7"})
        if tag.startswith("later") and n == 2:  # an HTTP date 30 s ahead
            return self._send(429, {"error": "slow down"}, {"Retry-After": formatdate(time.time() + 30, usegmt=True)})
        if tag.startswith("flaky") and n <= 2:
            return self._send(503, {"error": "overloaded"})
        if tag.startswith("bad"):
            return self._send(400, {"error": "bad request"})
        if tag.startswith("down"):
            return self._send(500, {"error": "broken"})
        answer = "I cannot see any images." if tag.startswith("nonsense") else GOOD
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": answer}}]})


@pytest.fixture
def chat_server():
    srv = _ChatServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _tagged(requests_, tags):
    return [replace(r, modification=f"[{t}] {r.modification}") for r, t in zip(requests_, tags)]


def test_remote_teacher_speaks_the_protocol_with_retries_and_bounded_concurrency(chat_server, requests_, monkeypatch):
    monkeypatch.setenv("CIRCOT_TEST_KEY", "sk-test")
    tags = ["ok1", "ok2", "ok3", "rate1", "flaky1", "slow1", "nonsense1", "bad1", "down1", "ok4"]
    reqs = _tagged(requests_, tags)
    teacher = RemoteTeacher(f"http://127.0.0.1:{chat_server.server_address[1]}/v1", "qwen2-vl-72b",
                            api_key_env="CIRCOT_TEST_KEY", max_concurrency=3, timeout_s=3.0, max_retries=3,
                            backoff_s=0.01)
    rows = dict(zip(tags, teacher.annotate(reqs)))
    for t in ("ok1", "ok2", "ok3", "ok4", "rate1", "flaky1", "slow1"):
        assert rows[t].ok and rows[t].teacher == "remote:qwen2-vl-72b", t
    assert rows["nonsense1"].status == "rejected" and rows["nonsense1"].reject_reason == "missing_section"
    assert rows["bad1"] is None and rows["down1"] is None  # failed requests: nothing recorded
    assert chat_server.calls["rate1"] == 2 and chat_server.calls["flaky1"] == 3 and chat_server.calls["slow1"] == 2
    assert chat_server.calls["bad1"] == 1 and chat_server.calls["down1"] == 4  # 400 is final; 500 retried 3 times
    assert len(teacher.errors) == 2 and any("HTTP 400" in e for e in teacher.errors)
    assert chat_server.auth == {"Bearer sk-test"}
    body = chat_server.bodies[0]
    assert body["model"] == "qwen2-vl-72b" and body["temperature"] == 0.0
    images = [c["image_url"]["url"] for c in body["messages"][-1]["content"] if c["type"] == "image_url"]
    assert len(images) == 2 and all(u.startswith("data:image/png;base64,") for u in images)
    # the request's own reference and target, in that order, pixel for pixel
    asked = reqs[tags.index(re.search(r"\[(\w+)\]", body["messages"][-1]["content"][-1]["text"]).group(1))]
    for url, path in zip(images, (asked.reference_path, asked.target_path)):
        with Image.open(path) as im:
            np.testing.assert_array_equal(pixels(base64.b64decode(url.split(",", 1)[1])), np.asarray(im.convert("RGB")))


def test_remote_teacher_keeps_at_most_max_concurrency_requests_in_flight(chat_server, requests_):
    teacher = RemoteTeacher(f"http://127.0.0.1:{chat_server.server_address[1]}/v1", "m", max_concurrency=3)
    chat_server.gather = 3   # the server holds the first requests until 3 are in flight at once
    rows = teacher.annotate(_tagged(requests_, [f"ok{i}" for i in range(9)]))
    assert all(r.ok for r in rows) and sum(chat_server.calls.values()) == 9   # none timed out and was sent again
    assert chat_server.max_in_flight == 3  # 3 requests at once, never more


def test_remote_teacher_without_a_key_sends_no_authorization(chat_server, requests_, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    teacher = RemoteTeacher(f"http://127.0.0.1:{chat_server.server_address[1]}/v1", "m", backoff_s=0.01)
    assert teacher.annotate(_tagged(requests_, ["ok"]))[0].ok
    assert chat_server.auth == {None}


def _complete(teacher: RemoteTeacher, request) -> tuple[str | TeacherRequestError, list[float]]:
    """One request through ``teacher.complete``: its answer (or error) and the waits between attempts."""
    waits: list[float] = []
    teacher.sleep = waits.append  # record the waits instead of sleeping them
    with httpx.Client() as client:
        try:
            return teacher.complete(request, client), waits
        except TeacherRequestError as e:
            return e, waits


def test_remote_teacher_waits_what_retry_after_asks_in_seconds_or_as_a_date(chat_server, requests_):
    teacher = RemoteTeacher(f"http://127.0.0.1:{chat_server.server_address[1]}/v1", "m", backoff_s=0.01)
    start = time.time()
    answer, waits = _complete(teacher, _tagged(requests_, ["later1"])[0])
    took = time.time() - start
    assert answer == GOOD and chat_server.calls["later1"] == 3  # 503, then 429, then the answer
    # the date is 30 s after the server wrote it, in whole seconds, read at most `took` later: the wait is the
    # date's distance, not the backoff (which alone would wait about 0.01 and 0.02 s)
    assert waits[0] == 7.0 and 29 - took <= waits[1] <= 30, (waits, took)
    assert retry_after_s("1.5") == 1.5 and retry_after_s(None) is None and retry_after_s("soon") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date already past: at once


def test_remote_teacher_backs_off_exponentially_with_jitter_then_gives_up_with_the_last_error(chat_server, requests_):
    teacher = RemoteTeacher(f"http://127.0.0.1:{chat_server.server_address[1]}/v1", "m", max_retries=4, backoff_s=1.0)
    runs = []
    for tag in ("down1", "down2"):
        error, waits = _complete(teacher, _tagged(requests_, [tag])[0])
        assert isinstance(error, TeacherRequestError) and chat_server.calls[tag] == 5  # the first try and 4 retries
        assert str(error).endswith("gave up after 5 attempts; last: HTTP 500: {\"error\": \"broken\"}")
        assert len(waits) == 4 and all(0.5 <= w / 2 ** i < 1.5 for i, w in enumerate(waits)), waits
        runs.append(waits)
    assert runs[0] != runs[1]  # jittered: two requests that fail alike do not retry in step


def test_remote_teacher_fails_at_once_on_other_statuses_and_retries_connection_errors(chat_server, requests_):
    teacher = RemoteTeacher(f"http://127.0.0.1:{chat_server.server_address[1]}/v1", "m", max_retries=3, backoff_s=0.01)
    error, waits = _complete(teacher, _tagged(requests_, ["bad1"])[0])
    assert str(error).endswith("HTTP 400: {\"error\": \"bad request\"}") and "gave up" not in str(error)
    assert chat_server.calls["bad1"] == 1 and waits == []  # a 4xx other than 429 is final
    answer, waits = _complete(teacher, _tagged(requests_, ["flaky1"])[0])
    assert answer == GOOD and chat_server.calls["flaky1"] == 3 and len(waits) == 2  # two 503s, then the answer
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    error, waits = _complete(RemoteTeacher(f"http://127.0.0.1:{closed}/v1", "m", max_retries=3, backoff_s=0.01),
                             requests_[0])
    assert isinstance(error, TeacherRequestError) and len(waits) == 3
    assert "gave up after 4 attempts; last: ConnectError" in str(error)
