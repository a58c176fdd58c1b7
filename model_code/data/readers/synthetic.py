"""cir-shapes, the synthetic benchmark (written by ``model_code.synthetic.generate``): its reader.

Layout: ``captions/cap.<split>.json``, ``image_splits/split.<split>.json``, ``images/<split>/*.png``
(and ``scene_graphs/<split>.json``, which the oracle and the reasoning metrics read).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import StrictBool, StrictInt, StrictStr

from model_code.data.formats import Entry, captions_and_split, clean_path, validate_entries
from model_code.data.tables import Benchmark, images_frame, triplets_frame


class SyntheticEntry(Entry):
    query_id: StrictStr
    reference: StrictStr
    target: StrictStr
    modification: StrictStr
    n_edits: StrictInt | None = None
    reference_dependent: StrictBool | None = None
    hard_negatives: list[StrictStr] = []


def read(spec, root: Path, split: str, category: str | None = None) -> Benchmark:
    path, entries, paths = captions_and_split(root, split)
    rows = []
    for e in validate_entries(SyntheticEntry, entries, path):
        rows.append({
            "query_id": e.query_id, "dataset": spec.name, "split": split,
            "reference_id": e.reference, "modification": e.modification,
            "target_ids": [e.target], "subset_ids": [],
            "n_edits": e.n_edits, "reference_dependent": e.reference_dependent,
            "hard_negative_ids": list(e.hard_negatives),
        })
    images = [{"image_id": k, "dataset": spec.name, "split": split, "path": clean_path(v)} for k, v in paths.items()]
    return Benchmark(triplets_frame(rows), images_frame(images))


def split_files(spec, root: Path, split: str, category: str | None = None) -> list[Path]:
    return [root / "captions" / f"cap.{split}.json"]


def annotation_files(spec, root: Path) -> list[Path]:
    return sorted(p for d in ("captions", "image_splits") for p in (root / d).glob("*.json"))
