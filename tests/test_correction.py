"""Corrections: a person rewrites the model's chain and searches with it (teacher-forced, no decoding);
the correction is kept, and a pick on the corrected search trains on the person's chain."""

from __future__ import annotations

import json
import re
import time

import pytest

from assets.feedback import feedback_suite, feedback_triplets
from model_code.annotation.judge import PERSON, judge_person
from model_code.annotation.store import read_annotations
from model_code.chain import CoT
from model_code.feedback import FeedbackError, FeedbackStore, collect_triplets, online_metrics, token_identity
from model_code.feedback_tables import read_feedback_tables
from model_code.retrieval import QueryError, check_chain
from tests.test_feedback_pipeline import Benchmark, _materialise, instance, png, tables  # noqa: F401 - fixtures

D = "synthetic"
GOOD = {"caption": "top left: large red circle", "reasoning": "The red circle is top left: large red circle. "
        "It becomes green.", "conclusion": "top left: large green circle"}


def test_a_chain_is_taken_as_sections_json_or_tagged_text_and_checked_as_a_teachers():
    cot = CoT(**GOOD)
    assert check_chain(GOOD) == cot
    assert check_chain(json.dumps(GOOD)) == cot
    assert check_chain(cot.render()) == cot
    assert check_chain({k: f"  {v} " for k, v in GOOD.items()}) == cot          # blanks around a section

    def refused(value) -> str:
        with pytest.raises(QueryError) as e:
            check_chain(value)
        assert e.value.status == 400
        return str(e.value)

    assert "missing_section" in refused("<caption>a red circle</caption><reasoning>make it green</reasoning>")
    assert "not valid JSON" in refused('{"caption": "a red')
    assert "unknown sections 'extra'" in refused({**GOOD, "extra": "x"})
    assert "each a text" in refused({"caption": "a large red circle", "reasoning": "make it green please"})
    assert "empty_section" in refused({**GOOD, "conclusion": " \u200b "})
    assert "leakage: target image" in refused({**GOOD, "reasoning": "the target image shows a large green circle"})
    assert "conclusion_repeats_caption" in refused({**GOOD, "conclusion": "Top left: large red circle."})
    assert check_chain({**GOOD, "conclusion": "green circle"}).conclusion == "green circle"   # short: searchable
    assert "too_long" in refused({**GOOD, "caption": " ".join(["red"] * 201)})
    assert "too_long" in refused({**GOOD, "reasoning": "x" * 1501})               # characters, before words
    assert "tag_in_section" in refused({**GOOD, "reasoning": "make it <conclusion>green</conclusion>"})
    assert "must be its three sections" in refused(["caption"])


def test_a_persons_chain_becomes_an_annotation_of_source_person_or_a_recorded_rejection():
    ok = judge_person("q1", GOOD)
    assert (ok.status, ok.teacher, ok.conclusion, ok.reject_reason) == ("ok", PERSON, GOOD["conclusion"], None)
    assert json.loads(ok.raw) == GOOD                                           # what the person wrote, kept
    bad = judge_person("q2", {**GOOD, "reasoning": "as in the second image"})
    assert (bad.status, bad.reject_reason, bad.conclusion) == ("rejected", "leakage: second image", None)
    assert judge_person("q3", {**GOOD, "conclusion": None}).reject_reason == "empty_section"
    assert judge_person("q4", {**GOOD, "conclusion": "green"}).reject_reason == "too_short"   # under the suite's
    # fewest words: searchable, but not trained on (the suite would fail the whole set)


def _searched(store, reference: bytes, modification: str, shown, token: str, chain=None) -> str:
    return store.record_query(reference=reference, suffix=".png", modification=modification, model_version="m1",
                              mode="cot", chain=chain, shown=shown, scores=[1.0] * len(shown), token=token)


def test_a_correction_refers_to_the_same_query_of_the_same_token_and_is_kept_as_an_event(tmp_path):
    store = FeedbackStore(tmp_path, D)
    model_chain = {**GOOD, "conclusion": "top left: large blue circle", "raw": "...", "error": None}
    image = png(1)
    first = _searched(store, image, "make it green", ["a", "b"], "alice", chain=model_chain)
    q = store.correction_of(first, "alice", reference=image, modification="  make it  green")
    assert q.query_id == first
    with pytest.raises(FeedbackError) as e:
        store.correction_of(first, "bob", reference=image, modification="make it green")   # another's query
    assert e.value.status == 404
    with pytest.raises(FeedbackError) as e:
        store.correction_of(first, "alice", reference=png(2), modification="make it green")
    assert e.value.status == 400 and "another reference image or modification" in str(e.value)
    with pytest.raises(FeedbackError) as e:
        store.correction_of(first, "alice", reference=image, modification="make it red")
    assert e.value.status == 400
    with pytest.raises(FeedbackError) as e:
        store.correction_of(first, "alice", reference=image, modification="make it green", now=time.time() + 8 * 86400)
    assert e.value.status == 410
    with pytest.raises(FeedbackError) as e:
        store.correction_of("0" * 32, "alice", reference=image, modification="make it green")
    assert e.value.status == 404

    # the corrected search, then a correction of the correction: both refer to the first query and the model's chain
    second = store.record_query(reference=image, suffix=".png", modification="make it green", model_version="m1",
                                mode="corrected", chain=GOOD, shown=["b", "a"], scores=[1.0, 0.5], token="alice",
                                corrects=q)
    store.record_correction(q, second, "alice", GOOD, ["conclusion"])
    again = {**GOOD, "reasoning": "The red circle is top left. It turns green."}
    third = store.record_query(reference=image, suffix=".png", modification="make it green", model_version="m1",
                               mode="corrected", chain=again, shown=["b"], scores=[1.0], token="alice",
                               corrects=store.query(second))
    store.record_correction(store.query(second), third, "alice", again, ["reasoning", "conclusion"])
    assert store.query(third).corrects == first and store.query(third).model_chain == model_chain
    corrections = [e for e in store.events() if e.kind == "correction"]
    assert [(e.query_id, e.corrected_query, e.changed, e.model_chain, e.token) for e in corrections] == [
        (first, second, ["conclusion"], model_chain, token_identity("alice")),
        (first, third, ["reasoning", "conclusion"], model_chain, token_identity("alice"))]
    assert corrections[1].chain == again
    # a pick on the corrected search is an answer as any other; the person's chain comes with its triplet
    store.add(third, "alice", chosen="b")
    store.add(first, "alice", rejected=["a"])                 # the first answer may still be judged too
    # a correction that changed nothing is the model's chain, not a person's: its pick trains on the teacher's
    unchanged = store.record_query(reference=png(3), suffix=".png", modification="make it round", model_version="m1",
                                   mode="corrected", chain=model_chain, shown=["a"], scores=[1.0], token="alice",
                                   corrects=store.query(_searched(store, png(3), "make it round", ["a"], "alice",
                                                                  chain=model_chain)))
    store.add(unchanged, "alice", chosen="a")
    rows, _, report = collect_triplets(store, gallery={"a": "train", "b": "train"}, held_out_ids=set(),
                                       held_out_hashes=set())
    assert (report["corrections"], report["events"], report["accepted"], report["person_chains"]) == (2, 3, 2, 1)
    by_target = {r["target_ids"][0]: r for r in rows}
    assert by_target["b"]["person_chain"] == again and by_target["a"]["person_chain"] is None
    # the online figure is the model's: picks on a corrected ranking are not counted for it
    assert online_metrics(store) == {}

    # a chain given without a query id, then corrected: there is no model's chain to compare with
    loose = store.record_query(reference=image, suffix=".png", modification="make it green", model_version="m1",
                               mode="corrected", chain=GOOD, shown=["a"], scores=[1.0], token="alice")
    again_loose = store.record_query(reference=image, suffix=".png", modification="make it green",
                                     model_version="m1", mode="corrected", chain=again, shown=["a"], scores=[1.0],
                                     token="alice", corrects=store.query(loose))
    event = store.record_correction(store.query(loose), again_loose, "alice", again, ["reasoning"])
    assert (event.query_id, event.model_chain) == (loose, None)          # filed under that answer, no model chain
    assert (store.query(again_loose).corrects, store.query(again_loose).model_chain) == (None, None)
    assert store.query(again_loose).persons_chain() == again


def test_a_pick_after_a_correction_trains_on_the_persons_chain_checked_by_the_annotation_suite(
        tables, instance, tmp_path):  # noqa: F811
    from assets.cot_annotations import cot_annotations

    b = Benchmark(tables)
    artifacts = tmp_path / "artifacts"
    assert _materialise([cot_annotations], instance, artifacts).success   # the teacher's chains of the benchmark
    store = FeedbackStore(artifacts / "feedback" / D, D)
    q0, q1 = b.train_queries.iloc[0], b.train_queries.iloc[1]
    picks = {}
    for name, q, chain in (("good", q0, GOOD), ("leaky", q1, {**GOOD, "reasoning": "as the target image shows"})):
        first = _searched(store, b.bytes(q.reference_id), q.modification, [b.train[5], q.target_ids[0]], "alice",
                          chain={**GOOD, "conclusion": "top left: small red circle"})
        corrected = store.record_query(
            reference=b.bytes(q.reference_id), suffix=".png", modification=q.modification, model_version="m1",
            mode="corrected", chain=chain, shown=[q.target_ids[0], b.train[5]], scores=[1.0, 0.5], token="alice",
            corrects=store.query(first))
        store.record_correction(store.query(first), corrected, "alice", chain, ["conclusion"])
        store.add(corrected, "alice", chosen=q.target_ids[0], rejected=[b.train[5]])
        picks[name] = f"fb-{corrected}-{token_identity('alice')}"

    result = _materialise([feedback_triplets, feedback_suite], instance, artifacts)
    assert result.success
    (check,) = result.get_asset_check_evaluations()
    assert check.passed, check.metadata
    meta = result.asset_materializations_for_node("feedback_triplets")[0].metadata
    assert (meta["corrections"].value, meta["person_chains"].value, meta["person_chains_rejected"].value) == (2, 1, 1)
    assert meta["person_reject_reasons"].value == {"leakage: target image": 1}
    # the teacher is asked only for the triplet whose person's chain failed (reused: the benchmark's content)
    assert (meta["annotated_this_run"].value, meta["already_stored"].value) == (0, 1)
    record = meta["record"].value
    assert (record["person_chains"], record["person_rejected"], record["teacher"]) == (1, 1, "oracle")
    people = read_annotations(f"{record['folder']}/person_chains.parquet").set_index("query_id")
    assert people.loc[picks["good"], ["teacher", "status"]].tolist() == [PERSON, "ok"]
    assert people.loc[picks["leaky"], ["teacher", "status", "reject_reason"]].tolist() == [
        PERSON, "rejected", "leakage: target image"]                    # kept, with its reason
    annotations = read_annotations(f"{record['folder']}/annotations.parquet").set_index("query_id")
    assert annotations.loc[picks["good"], ["teacher", "status", "conclusion"]].tolist() == [PERSON, "ok",
                                                                                            GOOD["conclusion"]]
    assert annotations.loc[picks["leaky"], ["teacher", "status"]].tolist() == ["oracle", "ok"]
    assert len(read_feedback_tables(record["folder"]).triplets) == 2     # both picks are triplets

    # the training's lineage counts the person's chain apart from a teacher's, and trains on it
    from types import SimpleNamespace

    from assets.resources import ArtifactStore
    from assets.training import _feedback_inputs
    from model_code.data import read_tables
    from model_code.model.recipes import pair_examples

    context = SimpleNamespace(instance=instance, log=SimpleNamespace(info=lambda m: None),
                              resources=SimpleNamespace(artifacts=ArtifactStore(root=str(artifacts))))
    fed, annotation_file, info = _feedback_inputs(context, D, b.bench, tables, tmp_path / "runs", 1.0)
    assert (info["person_chains"], info["teacher_chains"], info["triplets"]) == (1, 1, 2)
    weighted = read_tables(fed)
    examples = {e.query_id.split("#")[0]: e for e in pair_examples(weighted.triplets, weighted.images, tables.root,
                                                                   "train", read_annotations(annotation_file))}
    assert examples[picks["good"]].cot == CoT(**GOOD).render()
    assert examples[picks["leaky"]].cot == annotations.loc[picks["leaky"], ["caption", "reasoning", "conclusion"]
                                                           ].pipe(lambda a: CoT(*a).render())   # the teacher's

    from model_code.model_card import render_model_card

    card = render_model_card({"data": {D: {"raw": "r", "annotations": "a", "teacher": "oracle",
                                           "prompt_version": "v", "feedback": info}}})
    assert "chains written by people (corrections): 1, by the teacher: 1" in card


# ---------------------------------------------------------------------------------------------
# the page, as a person uses it: the embedded base served (its chains and its ranking follow the text)


@pytest.fixture
def base_served(tmp_path, tiny_synthetic):
    """The embedded base (an adapter that starts at zero: the base as it is) served with the tiny
    benchmark's test split as the gallery."""
    from tests._serving import Server, prepare
    from tests.conftest import REPO

    home = tmp_path / "serve"
    home.mkdir()
    env, _, _ = prepare(home, REPO / "model_code" / "model" / "embedded_base", tiny_synthetic)
    server = Server(env, home / "server.log")
    try:
        server.wait()
        yield server, home
    finally:
        server.stop()


def _oracle_conclusions(root) -> dict[str, str]:
    from model_code.synthetic import scenes
    from model_code.synthetic.oracle import oracle_cot

    graphs = json.loads((root / "scene_graphs" / "test.json").read_text())
    return {q["query_id"]: oracle_cot(q["query_id"], scenes.scene_from_json(graphs[q["reference"]]), q["edits"]
                                      ).conclusion
            for q in json.loads((root / "captions" / "cap.test.json").read_text())}


def _a_query_the_conclusion_fixes(server, bench, gallery, k: int):
    """A test query whose CoT search ranks the target below the first place while its chain with the
    oracle's conclusion (the rest as the model wrote it) ranks it first: (query, its CoT answer)."""
    paths = bench.images.set_index("image_id").path
    conclusions = _oracle_conclusions(gallery)
    for q in bench.triplets[bench.triplets.split == "test"].itertuples():
        image = (gallery / paths[q.reference_id]).read_bytes()
        code, body = server.search(image, q.modification, k=k, mode="cot")
        assert code == 200, body
        answer = json.loads(body)
        ranked = [h["image_id"] for h in answer["results"]]
        chain = answer["reasoning"]
        if chain["error"] or ranked[0] == q.target_ids[0] or chain["conclusion"] == conclusions[q.query_id]:
            continue
        fixed = {s: chain[s] for s in ("caption", "reasoning")} | {"conclusion": conclusions[q.query_id]}
        code, body = server.search(image, q.modification, k=k, chain=json.dumps(fixed))
        if code == 200 and json.loads(body)["results"][0]["image_id"] == q.target_ids[0]:
            return q, answer, conclusions[q.query_id]
    pytest.fail("no test query whose oracle conclusion ranks the target first where the model's chain did not")


def test_on_the_page_a_corrected_conclusion_lifts_the_target_to_rank_1_and_the_pick_keeps_the_correction(
        base_served, tiny_synthetic, page, tmp_path):
    from playwright.sync_api import expect

    from model_code.data import read_dataset

    server, home = base_served
    gallery = home / "cir-shapes"
    bench = read_dataset(D, gallery)
    k = 5
    q, answer, conclusion = _a_query_the_conclusion_fixes(server, bench, gallery, k)
    target = q.target_ids[0]
    reference = tmp_path / "reference.png"
    reference.write_bytes((gallery / bench.images.set_index("image_id").path[q.reference_id]).read_bytes())

    page.goto(server.url + "/ui/")
    expect(page.locator("#chain")).to_be_hidden()                     # no chain before a search
    page.set_input_files("#image", reference)
    page.fill("#modification", q.modification)
    page.fill("#k", str(k))
    with page.expect_response(lambda r: r.url.endswith("/search")) as searched:
        page.click("#submit")
    shown = searched.value.json()
    assert [h["image_id"] for h in shown["results"]] == [h["image_id"] for h in answer["results"]]
    expect(page.locator("#results figure").first).to_have_attribute("data-image-id", shown["results"][0]["image_id"])
    expect(page.locator("#chain-conclusion")).to_have_value(shown["reasoning"]["conclusion"])

    # the person corrects the conclusion in place, from the keyboard: the section is marked changed
    page.locator("#chain-conclusion").fill(conclusion)
    expect(page.locator("#chain-conclusion")).to_have_class(re.compile(r"\bchanged\b"))
    expect(page.locator("#chain textarea.changed")).to_have_count(1)
    with page.expect_response(lambda r: r.url.endswith("/search")) as corrected:
        page.locator("#chain-conclusion").press("Control+Enter")
    fixed = corrected.value.json()
    assert fixed["mode"] == "corrected" and fixed["correction"]["corrects"] == shown["query_id"]
    expect(page.locator("#changed")).to_have_text("Ranked with your correction (changed: conclusion).")
    expect(page.locator("#status")).to_contain_text(" · corrected · ")
    expect(page.locator("#results figure").first).to_have_attribute("data-image-id", target)   # now first
    expect(page.locator("#chain-conclusion")).to_have_value(conclusion)   # the chain the ranking used, still editable

    # pick / not this on the corrected results, as on any
    page.get_by_role("button", name=f"this is it: {target}").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#feedback-status")).to_have_text(f"Recorded: {target} is the image you wanted. Thank you.")

    store = FeedbackStore(home / "artifacts" / "feedback" / D, D)
    events = store.events()
    correction = next(e for e in events if e.kind == "correction")
    assert (correction.query_id, correction.corrected_query, correction.changed) == (
        shown["query_id"], fixed["query_id"], ["conclusion"])
    assert correction.chain["conclusion"] == conclusion
    assert correction.model_chain["conclusion"] == shown["reasoning"]["conclusion"]
    pick = next(e for e in events if e.kind == "answer")
    assert (pick.query_id, pick.chosen) == (fixed["query_id"], target)
    assert store.query(fixed["query_id"]).chain["conclusion"] == conclusion
    # another modification is another query: the chain shown belonged to the last one and goes
    page.fill("#modification", q.modification + " and make it bigger")
    expect(page.locator("#chain")).to_be_hidden()
