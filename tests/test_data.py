"""Readers on the real annotation files (../shared/benchmarks) and on small layouts made here."""

import json
from pathlib import Path

import pytest
from PIL import Image

from model_code.data import (
    DATASETS,
    Benchmark,
    DataError,
    MissingImagesError,
    available_splits,
    read_benchmark,
    read_dataset,
    read_tables,
    write_tables,
)
from tests.conftest import shared_benchmark


def test_cirr_val_counts_and_fields():
    root = shared_benchmark("cirr")
    raw = json.loads((root / "captions" / "cap.rc2.val.json").read_text())
    bench = read_benchmark("cirr", root, "val", require_images=False)
    t = bench.triplets
    assert len(t) == len(raw) == 4181
    assert len(bench.images) == len(json.loads((root / "image_splits" / "split.rc2.val.json").read_text())) == 2297
    first = t.iloc[0]
    assert first.query_id == str(raw[0]["pairid"]) and first.reference_id == raw[0]["reference"]
    assert first.modification == raw[0]["caption"] and first.target_ids == [raw[0]["target_hard"]]
    assert first.subset_ids == raw[0]["img_set"]["members"] and len(first.subset_ids) == 6
    assert (t.dataset == "cirr").all() and (t.split == "val").all()
    assert t.query_id.is_unique
    img = bench.images.set_index("image_id").loc[raw[0]["reference"]]
    assert img.path == "dev/" + raw[0]["reference"] + ".png"


def test_fashioniq_dress_val_joins_the_two_captions():
    root = shared_benchmark("fashioniq")
    raw = json.loads((root / "captions" / "cap.dress.val.json").read_text())
    t = read_benchmark("fashioniq", root, "val", category="dress", require_images=False).triplets
    assert len(t) == len(raw) == 2017
    for row, e in zip(t.itertuples(), raw[:50]):
        assert row.modification == f"{e['captions'][0].strip()} and {e['captions'][1].strip()}"
        assert row.reference_id == e["candidate"] and row.target_ids == [e["target"]]
        assert row.category == "dress"
    assert available_splits("fashioniq", root, category="dress") == ["train", "val", "test"]
    assert available_splits("fashioniq", root) == []  # shirt and toptee are not there


def test_hidden_test_split_reads_with_empty_targets():
    root = shared_benchmark("fashioniq")
    raw = json.loads((root / "captions" / "cap.dress.test.json").read_text())
    t = read_benchmark("fashioniq", root, "test", category="dress", require_images=False).triplets
    assert len(t) == len(raw) == 2024
    assert all(ids == [] for ids in t.target_ids)


def test_circo_val_has_several_ground_truths():
    root = shared_benchmark("circo")
    raw = json.loads((root / "annotations" / "val.json").read_text())
    bench = read_benchmark("circo", root, "val", require_images=False)
    t = bench.triplets
    assert len(t) == len(raw) == 220
    assert max(len(ids) for ids in t.target_ids) > 1
    row, e = t.iloc[0], raw[0]
    assert row.target_ids == [str(i) for i in e["gt_img_ids"]] and row.target_ids[0] == str(e["target_img_id"])
    assert row.reference_id == str(e["reference_img_id"]) and row.shared_concept == e["shared_concept"]
    assert row.modification == e["relative_caption"]
    # without the COCO gallery on disk the images table holds the images the queries name
    assert set(bench.images.image_id) >= set(t.reference_id)
    assert bench.images.path.iloc[0].endswith(f"{int(bench.images.image_id.iloc[0]):012d}.jpg")


def test_missing_images_are_reported_in_one_clear_error():
    root = shared_benchmark("cirr")
    with pytest.raises(MissingImagesError) as err:
        read_benchmark("cirr", root, "val")
    msg = str(err.value)
    assert "2297 of 2297 images are missing" in msg and str(root) in msg and "dev-" in msg


def _small_cirr(root: Path, source: Path, n: int = 12) -> list[dict]:
    """A CIRR layout with the first ``n`` real val queries and a tiny PNG per image they name."""
    entries = json.loads((source / "captions" / "cap.rc2.val.json").read_text())[:n]
    names = {e["reference"] for e in entries} | {m for e in entries for m in e["img_set"]["members"]}
    names |= {e["target_hard"] for e in entries}
    (root / "cirr" / "captions").mkdir(parents=True)
    (root / "cirr" / "image_splits").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "cirr" / "captions" / "cap.rc2.val.json").write_text(json.dumps(entries))
    (root / "cirr" / "image_splits" / "split.rc2.val.json").write_text(
        json.dumps({n: f"./dev/{n}.png" for n in sorted(names)}))
    for name in names:
        Image.new("RGB", (32, 24), (100, 50, 0)).save(root / "dev" / f"{name}.png")
    return entries


def test_images_on_disk_are_found_and_a_missing_one_is_named(tmp_path):
    entries = _small_cirr(tmp_path, shared_benchmark("cirr"))
    bench = read_benchmark("cirr", tmp_path, "val")  # annotations under cirr/, images under root
    assert len(bench.triplets) == len(entries)
    gone = entries[3]["target_hard"]
    (tmp_path / "dev" / f"{gone}.png").unlink()
    with pytest.raises(MissingImagesError, match=f"1 of .* images are missing .*{gone}"):
        read_benchmark("cirr", tmp_path, "val")


def test_malformed_annotation_files_fail_with_the_file_and_entry(tmp_path):
    (tmp_path / "annotations").mkdir()
    bad = tmp_path / "annotations" / "val.json"
    bad.write_text("[{\"id\": 0, \"reference_img_id\": 1}")
    with pytest.raises(DataError, match="not valid JSON"):
        read_benchmark("circo", tmp_path, "val", require_images=False)
    bad.write_text(json.dumps([{"id": 0, "reference_img_id": 1, "gt_img_ids": [2]}]))
    with pytest.raises(DataError, match="entry 0: has no field 'relative_caption'"):
        read_benchmark("circo", tmp_path, "val", require_images=False)
    bad.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DataError, match="expected a JSON list"):
        read_benchmark("circo", tmp_path, "val", require_images=False)


def test_unknown_names_and_splits_are_refused(tmp_path):
    with pytest.raises(DataError, match="unknown benchmark"):
        read_benchmark("coco", tmp_path, "val")
    with pytest.raises(DataError, match="cirr has no split 'test'"):
        read_benchmark("cirr", tmp_path, "test")
    with pytest.raises(DataError, match="annotation file not found"):
        read_benchmark("cirr", tmp_path, "val")
    assert set(DATASETS) == {"synthetic", "fashioniq", "cirr", "circo"}


def test_parquet_round_trip_keeps_lists_and_nulls(tiny_synthetic, tmp_path):
    bench = read_dataset("synthetic", tiny_synthetic)
    write_tables(bench, tmp_path)
    back = read_tables(tmp_path)
    assert isinstance(back, Benchmark)
    assert back.triplets.to_dict("records") == bench.triplets.to_dict("records")
    assert back.images.to_dict("records") == bench.images.to_dict("records")
    assert back.triplets.category.iloc[0] is None and isinstance(back.triplets.target_ids.iloc[0], list)
