"""Fashion IQ (Wu et al., CVPR 2021): its reader.

Layout: ``captions/cap.<category>.<split>.json``, ``image_splits/split.<category>.<split>.json`` and
``images/<ASIN>.png`` (or ``.jpg``), for the categories of its spec (dress, shirt, toptee), each its
own gallery. The query text joins each triplet's two captions as the benchmark's users do:
``"{c1} and {c2}"`` (without an empty one).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, StrictStr

from model_code.chain import is_blank
from model_code.data.formats import Entry, as_list, load_json, validate_entries
from model_code.data.tables import Benchmark, DataError, images_frame, triplets_frame


class FashionIQEntry(Entry):
    candidate: StrictStr
    target: StrictStr | None = None                # absent in the hidden test split
    captions: list[StrictStr] = Field(min_length=2, max_length=2)


def _image_path(asin: str, on_disk: set[str] | None) -> str:
    for ext in (".png", ".jpg"):
        if on_disk is not None and asin + ext in on_disk:
            return f"images/{asin}{ext}"
    return f"images/{asin}.png"


def _categories(spec, category: str | None) -> tuple[str, ...]:
    categories = spec.categories if category is None else (category,)
    for c in categories:
        if c not in spec.categories:
            raise DataError(f"{spec.name} has no category {c!r}; its categories: {', '.join(spec.categories)}")
    return categories


def read(spec, root: Path, split: str, category: str | None = None) -> Benchmark:
    image_dir = root / "images"
    on_disk = set(os.listdir(image_dir)) if image_dir.is_dir() else None
    rows, images = [], []
    for c in _categories(spec, category):
        path = root / "captions" / f"cap.{c}.{split}.json"
        entries = as_list(load_json(path), path)
        for i, e in enumerate(validate_entries(FashionIQEntry, entries, path)):
            if e.target is None and split not in spec.hidden_splits:
                raise DataError(f"{path}: entry {i}: field 'target' is missing or null; expected the target's ASIN "
                                f"(only the hidden test split has none)")
            parts = [cap.strip() for cap in e.captions if not is_blank(cap)]
            if not parts:
                raise DataError(f"{path}: entry {i}: field 'captions': both captions are empty; "
                                f"expected at least one modification text")
            rows.append({
                "query_id": f"{c}-{split}-{i:05d}", "dataset": spec.name, "split": split, "category": c,
                "reference_id": e.candidate, "modification": " and ".join(parts),
                "target_ids": [e.target] if e.target else [],
            })
        split_path = root / "image_splits" / f"split.{c}.{split}.json"
        asins = as_list(load_json(split_path), split_path)
        for k, asin in enumerate(asins):
            if not isinstance(asin, str) or not asin:
                raise DataError(f"{split_path}: entry {k}: expected an image ASIN (a string), got {asin!r}")
            images.append({"image_id": asin, "dataset": spec.name, "split": split, "category": c,
                           "path": _image_path(asin, on_disk)})
    return Benchmark(triplets_frame(rows), images_frame(images))


def split_files(spec, root: Path, split: str, category: str | None = None) -> list[Path]:
    return [root / "captions" / f"cap.{c}.{split}.json" for c in _categories(spec, category)]


def annotation_files(spec, root: Path) -> list[Path]:
    return sorted(p for d in ("captions", "image_splits") for p in (root / d).glob("*.json"))
