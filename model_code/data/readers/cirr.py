"""CIRR (Liu et al., ICCV 2021), release rc2: its reader and its evaluation server's files.

Layout: ``captions/cap.rc2.<split>.json`` and ``image_splits/split.rc2.<split>.json`` under the root
or under ``root/cirr``; image paths in the split file are relative to the root
(``./dev/dev-244-0-img0.png``). The query text is the entry's ``caption``; each query's
``img_set.members`` are its ``subset_ids`` (Recall_subset@K).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import StrictFloat, StrictInt, StrictStr

from model_code.data.formats import Entry, captions_and_split, clean_path, validate_entries
from model_code.data.tables import Benchmark, DataError, images_frame, triplets_frame


class CirrImageSet(Entry):
    id: StrictInt
    members: list[StrictStr]


class CirrEntry(Entry):
    pairid: StrictInt
    reference: StrictStr
    caption: StrictStr
    target_hard: StrictStr | None = None           # absent in the hidden test1 split
    target_soft: dict[StrictStr, StrictFloat | StrictInt] | None = None
    img_set: CirrImageSet


def _annotation_dir(root: Path) -> Path:
    return root if (root / "captions").is_dir() else root / "cirr"


def read(spec, root: Path, split: str, category: str | None = None) -> Benchmark:
    path, entries, paths = captions_and_split(_annotation_dir(root), f"rc2.{split}")
    rows = []
    for i, e in enumerate(validate_entries(CirrEntry, entries, path)):
        if e.target_hard is None and split not in spec.hidden_splits:
            raise DataError(f"{path}: entry {i} (pairid {e.pairid}): field 'target_hard' is missing or null; "
                            f"expected the target image's name (only the hidden test1 split has none)")
        rows.append({
            "query_id": str(e.pairid), "dataset": spec.name, "split": split,
            "reference_id": e.reference, "modification": e.caption,
            "target_ids": [e.target_hard] if e.target_hard else [], "subset_ids": list(e.img_set.members),
        })
    images = [{"image_id": k, "dataset": spec.name, "split": split, "path": clean_path(v)} for k, v in paths.items()]
    return Benchmark(triplets_frame(rows), images_frame(images))


def split_files(spec, root: Path, split: str, category: str | None = None) -> list[Path]:
    return [_annotation_dir(root) / "captions" / f"cap.rc2.{split}.json"]


def annotation_files(spec, root: Path) -> list[Path]:
    ann = _annotation_dir(root)
    return sorted(p for d in ("captions", "image_splits") for p in (ann / d).glob("*.json"))


def submissions(spec, split: str, method: str, rankings: dict, subset_rankings: dict,
                query_ids: list[str]) -> dict[str, dict]:
    """The rc2 files of CIRR's evaluation server: the top 50 for Recall and the top 3 of the query's
    subset for Recall_subset, keyed by pairid."""
    recall = {"version": "rc2", "metric": "recall"}
    subset = {"version": "rc2", "metric": "recall_subset"}
    for qid in query_ids:
        recall[qid] = rankings[qid][:50]
        subset[qid] = subset_rankings[qid]
    return {f"{spec.name}_{split}_{method}_recall.json": recall,
            f"{spec.name}_{split}_{method}_recall_subset.json": subset}
