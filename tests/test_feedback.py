"""The feedback store and the triplets it becomes (model_code/feedback.py)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from model_code.common import bytes_md5
from model_code.feedback import FeedbackError, FeedbackStore, collect_triplets, online_metrics, token_identity

SHOWN = ["g1", "g2", "g3", "g4"]


def _query(store, reference=b"png-bytes", modification="make it red", token="alice", shown=SHOWN, version="m1"):
    return store.record_query(reference=reference, suffix=".png", modification=modification, model_version=version,
                              mode="cot", chain={"caption": "c"}, shown=shown, scores=[0.9, 0.8, 0.7, 0.6],
                              token=token)


def test_an_answer_is_kept_once_and_a_contradiction_refused(tmp_path):
    store = FeedbackStore(tmp_path, "synthetic")
    qid = _query(store)
    event, created = store.add(qid, "alice", chosen="g2", rejected=["g1"])
    assert created and event.token == token_identity("alice") != "alice"
    again, created = store.add(qid, "alice", chosen="g2", rejected=["g1"])
    assert not created and again == event                     # the same answer is not written twice
    with pytest.raises(FeedbackError, match="already answered") as e:
        store.add(qid, "alice", chosen="g3")
    assert e.value.status == 409
    store.add(qid, "bob", none_of_these=True)                  # another token answers on its own
    assert [(e.token, e.chosen, e.none_of_these) for e in store.events()] == [
        (token_identity("alice"), "g2", False), (token_identity("bob"), None, True)]
    # the reference kept once, named by its content, and the query with what was shown
    (image,) = (tmp_path / "images").glob("*.png")
    assert image.name == f"{bytes_md5(b'png-bytes')}.png" and image.read_bytes() == b"png-bytes"
    assert store.query(qid).reference_file == f"images/{image.name}" and store.query(qid).shown == SHOWN


@pytest.mark.parametrize("kwargs,status,says", [
    (dict(query_id="0" * 32, chosen="g1"), 404, "unknown query"),
    (dict(query_id="../../etc/passwd", chosen="g1"), 404, "not a query id"),
    (dict(chosen="zz"), 400, "not shown for query"),
    (dict(rejected=["g1", "zz"]), 400, "not shown for query .*: zz$"),
    (dict(), 400, "say something"),
    (dict(chosen="g1", none_of_these=True), 400, "contradicts"),
    (dict(chosen="g1", rejected=["g1"]), 400, "both chosen and rejected"),
    (dict(chosen="g1", now=time.time() + 8 * 24 * 3600), 410, "expired"),
])
def test_feedback_that_cannot_be_taken_is_refused_with_its_status(tmp_path, kwargs, status, says):
    store = FeedbackStore(tmp_path, "synthetic")
    kwargs = dict(kwargs)
    qid = kwargs.pop("query_id", None) or _query(store)
    with pytest.raises(FeedbackError, match=says) as e:
        store.add(qid, "alice", **kwargs)
    assert e.value.status == status and not store.events()


def _writer(root, qids, token, start, pause, written=None, hold_after=None, hold=None):
    """Answer every query of ``qids`` as ``token``, counting each answer written in ``written``;
    after ``hold_after`` answers, wait on ``hold`` (which the test never sets: it is killed there
    at the latest)."""
    store = FeedbackStore(root, "synthetic")
    start.wait()
    for n, qid in enumerate(qids, 1):
        store.add(qid, token, chosen="g1")
        if written is not None:
            with written.get_lock():
                written.value = n
        if n == hold_after:
            hold.wait(120)
        if pause:
            time.sleep(pause)


def test_no_event_lost_or_doubled_under_32_concurrent_writers_with_one_killed(tmp_path):
    store = FeedbackStore(tmp_path, "synthetic")
    qids = [_query(store, reference=bytes([i])) for i in range(20)]
    ctx = multiprocessing.get_context("fork")
    start, hold = ctx.Event(), ctx.Event()
    written = ctx.Value("i", 0)
    # worker 0 writes with a pause between answers and stops after its 15th at the latest: killed once it has
    # written 3, it is killed in the middle of its work whatever the machine's speed
    workers = [ctx.Process(target=_writer, args=(tmp_path, qids, f"token-{w}", start, 0.01) + (
        (written, 15, hold) if w == 0 else ())) for w in range(32)]
    for p in workers:
        p.start()
    start.set()
    deadline = time.monotonic() + 120
    while written.value < 3 and time.monotonic() < deadline and workers[0].is_alive():
        time.sleep(0.005)
    assert written.value >= 3 and workers[0].is_alive(), "worker 0 did not start its work"
    os.kill(workers[0].pid, signal.SIGKILL)                     # a worker killed mid-run
    for p in workers:
        p.join(60)
    assert workers[0].exitcode == -signal.SIGKILL               # it died of the kill, not at the end of its work
    assert all(p.exitcode == 0 for p in workers[1:])
    events = store.events()
    per_token = {}
    for e in events:
        per_token.setdefault(e.token, []).append(e.query_id)
    assert all(sorted(per_token[token_identity(f"token-{w}")]) == sorted(qids) for w in range(1, 32))
    assert len(events) == len({(e.query_id, e.token) for e in events})   # none written twice
    # the killed worker's events so far are whole (each one parses) and partial: what it had written, perhaps
    # one more, never all 20
    killed = per_token.get(token_identity("token-0"), [])
    assert 3 <= written.value <= len(killed) <= min(written.value + 1, 15), (written.value, len(killed))
    assert sorted(killed) == sorted(qids[:len(killed)])             # the first ones, in the order it wrote them
    # a rerun completes it
    _writer(tmp_path, qids, "token-0", type("E", (), {"wait": lambda self: None})(), 0)
    assert sorted(e.query_id for e in store.events() if e.token == token_identity("token-0")) == sorted(qids)


def test_triplets_from_feedback_guard_leakage_cap_tokens_and_drop_duplicates(tmp_path):
    store = FeedbackStore(tmp_path, "synthetic")
    gallery = {"g1": "train", "g2": "train", "g3": "test", "g4": "train"}
    a = _query(store, reference=b"new image", token="alice")
    store.add(a, "alice", chosen="g2", rejected=["g1", "g3"])      # accepted; g3 (held out) is no negative
    store.add(a, "bob", chosen="g2")                               # the same triplet again: a duplicate
    b = _query(store, reference=b"a test image", modification="bigger", token="alice")
    store.add(b, "alice", chosen="g1")                             # its reference is a test image: a leak
    c = _query(store, reference=b"other", modification="smaller", token="alice")
    store.add(c, "alice", chosen="g3")                             # its target is a test image: a leak
    d = _query(store, reference=b"train ref", modification="rotate", token="carol")
    store.add(d, "carol", chosen="g4")
    e = _query(store, reference=b"train ref", modification="flip", token="carol")
    store.add(e, "carol", chosen="g1")                             # over carol's cap of 1
    store.add(e, "dave", none_of_these=True)
    import hashlib

    md5 = lambda b: hashlib.md5(b).hexdigest()  # noqa: E731
    triplets, images, report = collect_triplets(
        store, gallery=gallery, held_out_ids={"g3", "t9"}, held_out_hashes={md5(b"a test image")},
        known_hashes={md5(b"train ref"): "g4"}, cap_per_token=1)
    assert [(t["reference_id"], t["target_ids"], t["hard_negative_ids"]) for t in triplets] == [
        (f"fb-{md5(b'new image')}", ["g2"], ["g1"]), ("g4", ["g4"], [])]
    assert all(t["split"] == "train" for t in triplets)
    assert [i["image_id"] for i in images] == [f"fb-{md5(b'new image')}"] and os.path.isfile(images[0]["path"])
    assert report == {"events": 7, "accepted": 2, "none_of_these": 1, "rejected_only": 0, "leak": 2,
                      "duplicate": 1, "over_cap": 1, "unknown": 0, "corrections": 0, "person_chains": 0}


def test_online_metrics_per_model_version(tmp_path):
    store = FeedbackStore(tmp_path, "synthetic")
    for i, (version, answer) in enumerate([("m1", dict(chosen="g1")), ("m1", dict(chosen="g3")),
                                           ("m1", dict(none_of_these=True)), ("m2", dict(chosen="g2")),
                                           ("m2", dict(rejected=["g1"]))]):
        store.add(_query(store, reference=bytes([i]), version=version), "alice", **answer)
    assert online_metrics(store) == {
        "m1": {"answered": 3, "pick_at_1": 1 / 3, "pick_in_10": 2 / 3, "none_of_these": 1 / 3},
        "m2": {"answered": 1, "pick_at_1": 0.0, "pick_in_10": 1.0, "none_of_these": 0.0}}


def test_an_object_store_root_keeps_queries_and_answers_the_same_way():
    """The service on an object-store artifacts root (memory:// here; s3://, gs:// alike through fsspec)."""
    import uuid

    import fsspec

    root = f"memory://feedback-{uuid.uuid4().hex[:8]}/synthetic"
    store = FeedbackStore(root, "synthetic")
    qid = _query(store)
    event, created = store.add(qid, "alice", chosen="g2", rejected=["g1"])
    assert created and store.add(qid, "alice", chosen="g2", rejected=["g1"]) == (event, False)
    with pytest.raises(FeedbackError, match="already answered") as e:
        store.add(qid, "alice", chosen="g3")
    assert e.value.status == 409
    with pytest.raises(FeedbackError, match="unknown query"):
        store.add("0" * 32, "alice", chosen="g1")
    assert [x.chosen for x in store.events()] == ["g2"] and list(store.queries()) == [qid]
    fs = fsspec.filesystem("memory")
    assert fs.cat_file(f"{root.removeprefix('memory://')}/images/{store.query(qid).reference_hash}.png") == b"png-bytes"
