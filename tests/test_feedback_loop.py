"""The feedback loop end to end (issue 26): a person searches on the page with a train query the model gets
wrong, marks the images ranked above the true target "not this" and picks the true target; the pipeline
then turns that answer into a checked feedback triplet with those hard negatives."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
from playwright.sync_api import Page, expect

from assets.feedback import feedback_suite, feedback_triplets
from assets.resources import AnnotatorResource, ArtifactStore
from model_code.data import read_dataset
from model_code.feedback_tables import read_feedback_tables
from tests._serving import Server, prepare
from tests.test_feedback_pipeline import instance, tables  # noqa: F401 - the fixtures, shared

D = "synthetic"


@pytest.fixture
def served(tmp_path, micro_base, tiny_synthetic):
    """The micro model served with a gallery of the tiny benchmark's test and train splits."""
    home = tmp_path / "serve"
    home.mkdir()
    env, _, _ = prepare(home, micro_base, tiny_synthetic, splits=("test", "train"))
    server = Server(env, home / "server.log")
    try:
        server.wait()
        yield server, env, home
    finally:
        server.stop()


def _a_query_the_model_gets_wrong(server, bench, gallery: Path, most: int = 12):
    """A train query whose true target the model ranks 2nd to ``most``-th, with a train image above it."""
    paths = bench.images.set_index("image_id").path
    train = set(bench.images[bench.images.split == "train"].image_id)
    queries = bench.triplets[bench.triplets.split == "train"]
    for q in queries.itertuples():
        code, body = server.search((gallery / paths[q.reference_id]).read_bytes(), q.modification, k=most,
                                   mode="no_cot")
        assert code == 200, body
        ranked = [h["image_id"] for h in json.loads(body)["results"]]
        target = q.target_ids[0]
        if target in ranked[1:] and train & set(ranked[:ranked.index(target)]):
            return q, ranked[:ranked.index(target) + 1]
    pytest.fail(f"the micro model ranks no train query's target 2nd to {most}-th below a train image")


def test_a_pick_on_the_page_becomes_a_checked_feedback_triplet_with_hard_negatives(served, tables, instance,  # noqa: F811
                                                                                   page: Page, tmp_path):
    server, env, home = served
    gallery = home / "cir-shapes"
    bench = read_dataset(D, gallery)
    train = set(bench.images[bench.images.split == "train"].image_id)
    q, ranked = _a_query_the_model_gets_wrong(server, bench, gallery)
    target, above = ranked[-1], ranked[:-1]
    reference = tmp_path / "reference.png"
    reference.write_bytes((gallery / bench.images.set_index("image_id").path[q.reference_id]).read_bytes())

    page.goto(server.url + "/ui/")
    page.set_input_files("#image", reference)
    page.fill("#modification", q.modification)
    page.fill("#k", str(len(ranked)))
    page.select_option("#mode", "no_cot")
    with page.expect_response(lambda r: r.url.endswith("/search")) as searched:
        page.click("#submit")
    answer = searched.value.json()
    assert [h["image_id"] for h in answer["results"]] == ranked        # what the page shows: target not first
    expect(page.locator("#results figure")).to_have_count(len(ranked))
    for wrong in above:
        page.get_by_role("button", name=f"not this: {wrong}").click()
        expect(page.get_by_role("button", name=f"not this: {wrong}")).to_have_attribute("aria-pressed", "true")
    page.get_by_role("button", name=f"this is it: {target}").click()
    expect(page.locator("#feedback-status")).to_have_text(
        f"Recorded: {target} is the image you wanted; not this: {', '.join(above)}. Thank you.")

    # the pipeline reads what the service wrote (the same artifacts root) and makes the triplet of it
    result = dg.materialize([feedback_triplets, feedback_suite], partition_key=D, instance=instance,
                            raise_on_error=False,
                            resources={"artifacts": ArtifactStore(root=env["CIRCOT_ARTIFACTS"]),
                                       "annotator": AnnotatorResource()})
    assert result.success
    (check,) = result.get_asset_check_evaluations()
    assert check.passed, check.metadata
    meta = result.asset_materializations_for_node("feedback_triplets")[0].metadata
    assert (meta["events"].value, meta["accepted"].value) == (1, 1)
    folder = Path(meta["record"].value["folder"])
    assert folder.is_relative_to(Path(env["CIRCOT_ARTIFACTS"]) / "feedback_triplets" / D)
    rows = read_feedback_tables(folder).triplets
    got = [(r.reference_id, r.modification, list(r.target_ids), sorted(r.hard_negative_ids), r.split)
           for r in rows.itertuples()]
    negatives = sorted(i for i in above if i in train)          # the marked test images are held out: dropped
    assert negatives and got == [(q.reference_id, q.modification, [target], negatives, "train")]
