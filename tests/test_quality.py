"""The Great Expectations suites pass clean data and catch planted defects with readable reports."""

import pytest

from model_code.data import read_benchmark, read_dataset
from model_code.data.quality import DataQualityError, probe_image, validate_images, validate_triplets
from tests.conftest import shared_benchmark


@pytest.fixture
def bench(tiny_synthetic):
    return read_dataset("synthetic", tiny_synthetic)


def _failed(report):
    return {o.description: o for o in report.failed}


def test_clean_tables_pass(bench, tiny_synthetic):
    triplets_report = validate_triplets(bench.triplets, bench.images)
    images_report = validate_images(bench.images, tiny_synthetic)
    assert triplets_report.success, triplets_report.to_text()
    assert images_report.success, images_report.to_text()
    triplets_report.raise_for_failure()
    assert len(images_report.outcomes) == 6


def test_real_annotations_pass_without_images():
    root = shared_benchmark("cirr")
    bench = read_benchmark("cirr", root, "val", require_images=False)
    report = validate_triplets(bench.triplets, bench.images)
    assert report.success, report.to_text()


def test_duplicate_id_empty_text_and_bad_lists_are_named_with_example_rows(bench):
    t = bench.triplets.copy()
    dup = t.loc[1, "query_id"]
    t.loc[2, "query_id"] = dup
    t.loc[5, "modification"] = "   "
    t.loc[6, "modification"] = None
    t.loc[10, "modification"] = "\u200b\u2060\u200e"   # only format characters: as empty as blanks
    t.loc[11, "modification"] = "\u3164\u2800\ufe0f"   # fillers and selectors draw nothing either
    t.at[7, "subset_ids"] = ["x", "x"]
    t.at[8, "target_ids"] = "val_000001"  # a string where a list belongs
    t.loc[9, "split"] = "training"
    report = validate_triplets(t, bench.images)
    failed = _failed(report)
    assert set(failed) == {"query ids are unique", "modification texts are not empty",
                           "every query has a modification text", "subset_ids is a list of distinct non-empty ids",
                           "target_ids is a list of distinct non-empty ids", "split is one of test, train, val",
                           "queries name a target unless their split hides it",
                           "every image a query names is in the images table of its split"}
    assert failed["query ids are unique"].unexpected_count == 2
    assert failed["query ids are unique"].examples[0]["query_id"] == dup
    assert failed["modification texts are not empty"].examples == [
        {"modification": "   ", "query_id": t.loc[5, "query_id"]},
        {"modification": "\u200b\u2060\u200e", "query_id": t.loc[10, "query_id"]},
        {"modification": "\u3164\u2800\ufe0f", "query_id": t.loc[11, "query_id"]},
    ]
    assert "repeated id" in failed["subset_ids is a list of distinct non-empty ids"].examples[0]["subset_ids_form"]
    with pytest.raises(DataQualityError) as err:
        report.raise_for_failure()
    text = str(err.value)
    assert "FAILED 8 of 11 expectations" in text and "expect_column_values_to_be_unique(query_id)" in text
    assert dup in text and t.loc[5, "query_id"] in text
    assert "| ❌ | query ids are unique |" in report.to_markdown()


def test_reference_or_target_missing_from_images_table(bench):
    images = bench.images[bench.images.image_id != bench.triplets.target_ids.iloc[0][0]]
    images = images[images.image_id != bench.triplets.reference_id.iloc[3]]
    failed = _failed(validate_triplets(bench.triplets, images))
    (outcome,) = failed.values()
    assert outcome.unexpected_count >= 2
    roles = {(e["query_id"], e["role"]) for e in outcome.examples}
    assert (bench.triplets.query_id.iloc[0], "target_ids") in roles
    assert (bench.triplets.query_id.iloc[3], "reference") in roles


def test_image_from_another_split_counts_as_missing(bench):
    t = bench.triplets.copy()
    test_image = bench.images[bench.images.split == "test"].image_id.iloc[0]
    t.at[0, "target_ids"] = [test_image]  # a train query pointing into the test gallery
    failed = _failed(validate_triplets(t, bench.images))
    assert list(failed) == ["every image a query names is in the images table of its split"]


def test_missing_and_truncated_images_are_caught(bench, synthetic_copy):
    paths = bench.images.set_index("image_id").path
    victim_missing, victim_truncated = bench.images.image_id.iloc[4], bench.images.image_id.iloc[9]
    (synthetic_copy / paths[victim_missing]).unlink()
    f = synthetic_copy / paths[victim_truncated]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert probe_image(f)[0].startswith("undecodable")
    report = validate_images(bench.images, synthetic_copy)
    failed = _failed(report)
    assert list(failed) == ["image files exist and decode"]
    ex = {e["image_id"]: e["file_status"] for e in failed["image files exist and decode"].examples}
    assert ex[victim_missing] == "missing" and ex[victim_truncated].startswith("undecodable")


def test_image_sizes_out_of_bounds_and_duplicate_ids(bench, tiny_synthetic):
    report = validate_images(bench.images, tiny_synthetic, side_bounds=(100, 200))  # tiny images are 64 px
    assert {"image width in [100, 200] px", "image height in [100, 200] px"} == set(_failed(report))
    images = bench.images.copy()
    images.loc[3, "image_id"] = images.loc[2, "image_id"]
    failed = _failed(validate_images(images))
    assert list(failed) == ["image ids are unique within their split"]
