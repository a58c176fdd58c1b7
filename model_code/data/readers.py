"""Readers that bring every benchmark into the normalised tables of docs/architecture.md §4.

``read_benchmark(name, root, split)`` returns ``Benchmark(triplets, images)``; one reader per
benchmark understands its official layout:

- ``synthetic`` (cir-shapes, written by ``model_code.synthetic.generate``): ``captions/cap.<split>.json``,
  ``image_splits/split.<split>.json``, ``images/<split>/*.png``.
- ``cirr``: ``captions/cap.rc2.<split>.json`` and ``image_splits/split.rc2.<split>.json`` under
  ``root`` or ``root/cirr``; image paths in the split file are relative to ``root``
  (``./dev/dev-244-0-img0.png``).
- ``fashioniq``: ``captions/cap.<category>.<split>.json``, ``image_splits/split.<category>.<split>.json``
  and ``images/<ASIN>.png`` (or ``.jpg``).
- ``circo``: ``annotations/<split>.json`` and the COCO 2017 unlabeled gallery at
  ``COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg`` (or ``unlabeled2017/`` under ``root``),
  listed by ``COCO2017_unlabeled/annotations/image_info_unlabeled2017.json`` when present.

The tables themselves (columns, Parquet) are in ``model_code/data/tables.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from model_code.chain import is_blank
from model_code.benchmarks import BENCHMARKS
from model_code.data.formats import (CircoEntry, CircoImageInfo, CirrEntry, FashionIQEntry, SyntheticEntry, validate,
                                     validate_entries)
from model_code.data.tables import (DATASETS, FASHIONIQ_CATEGORIES, HIDDEN_SPLITS, LIST_COLUMNS, SPLITS, Benchmark,
                                    DataError, MissingImagesError, images_frame, triplets_frame)

log = logging.getLogger(__name__)
_COCO_NAME = re.compile(r"\d{12}\.jpg")


# ---------------------------------------------------------------------------------------------
# shared helpers


def _load_json(path: Path):
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None


def _as_list(entries, path: Path) -> list:
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    return entries



def _check_images(name: str, root: Path, images: pd.DataFrame, triplets: pd.DataFrame) -> None:
    """Every gallery image and every image a query names must exist under ``root``."""
    paths = dict(zip(images["image_id"], images["path"]))
    named = set(triplets["reference_id"])
    for col in LIST_COLUMNS:
        for ids in triplets[col]:
            named.update(ids)
    missing = sorted(i for i in named if i not in paths)
    missing += sorted(i for i, p in paths.items() if not (root / p).is_file())
    if missing:
        raise MissingImagesError(name, root, missing, len(set(paths) | named))


def _check_split(name: str, split: str) -> None:
    if name not in SPLITS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(DATASETS)}")
    if split not in SPLITS[name]:
        raise DataError(f"{name} has no split {split!r}; its splits: {', '.join(SPLITS[name])}")


# ---------------------------------------------------------------------------------------------
# readers


def _captions_and_split(ann: Path, stem: str) -> tuple[Path, list, dict]:
    """The CIRR-style pair ``captions/cap.<stem>.json`` (entries) and ``image_splits/split.<stem>.json``
    (image name -> relative path) that cir-shapes also follows."""
    path = ann / "captions" / f"cap.{stem}.json"
    entries = _as_list(_load_json(path), path)
    split_path = ann / "image_splits" / f"split.{stem}.json"
    paths = _load_json(split_path)
    if not isinstance(paths, dict):
        raise DataError(f"{split_path}: expected a JSON object of image name -> path, got {type(paths).__name__}")
    for name, rel in paths.items():
        if not isinstance(rel, str) or not rel:
            raise DataError(f"{split_path}: entry {name!r}: expected a relative image path (a string), got {rel!r}")
    return path, entries, paths


def read_synthetic(root: Path, split: str, category: str | None = None) -> Benchmark:
    path, entries, paths = _captions_and_split(root, split)
    rows = []
    for e in validate_entries(SyntheticEntry, entries, path):
        rows.append({
            "query_id": e.query_id, "dataset": "synthetic", "split": split,
            "reference_id": e.reference, "modification": e.modification,
            "target_ids": [e.target], "subset_ids": [],
            "n_edits": e.n_edits, "reference_dependent": e.reference_dependent,
            "hard_negative_ids": list(e.hard_negatives),
        })
    images = [{"image_id": k, "dataset": "synthetic", "split": split, "path": _clean(v)} for k, v in paths.items()]
    return Benchmark(triplets_frame(rows), images_frame(images))


def _clean(rel: str) -> str:
    return rel[2:] if rel.startswith("./") else rel


def _cirr_annotation_dir(root: Path) -> Path:
    return root if (root / "captions").is_dir() else root / "cirr"


def read_cirr(root: Path, split: str, category: str | None = None) -> Benchmark:
    path, entries, paths = _captions_and_split(_cirr_annotation_dir(root), f"rc2.{split}")
    rows = []
    for i, e in enumerate(validate_entries(CirrEntry, entries, path)):
        if e.target_hard is None and ("cirr", split) not in HIDDEN_SPLITS:
            raise DataError(f"{path}: entry {i} (pairid {e.pairid}): field 'target_hard' is missing or null; "
                            f"expected the target image's name (only the hidden test1 split has none)")
        rows.append({
            "query_id": str(e.pairid), "dataset": "cirr", "split": split,
            "reference_id": e.reference, "modification": e.caption,
            "target_ids": [e.target_hard] if e.target_hard else [], "subset_ids": list(e.img_set.members),
        })
    images = [{"image_id": k, "dataset": "cirr", "split": split, "path": _clean(v)} for k, v in paths.items()]
    return Benchmark(triplets_frame(rows), images_frame(images))


def _fashioniq_image_path(root: Path, asin: str, on_disk: set[str] | None) -> str:
    for ext in (".png", ".jpg"):
        if on_disk is not None and asin + ext in on_disk:
            return f"images/{asin}{ext}"
    return f"images/{asin}.png"


def read_fashioniq(root: Path, split: str, category: str | None = None) -> Benchmark:
    categories = FASHIONIQ_CATEGORIES if category is None else (category,)
    for c in categories:
        if c not in FASHIONIQ_CATEGORIES:
            raise DataError(f"fashioniq has no category {c!r}; its categories: {', '.join(FASHIONIQ_CATEGORIES)}")
    image_dir = root / "images"
    on_disk = set(os.listdir(image_dir)) if image_dir.is_dir() else None
    rows, images = [], []
    for c in categories:
        path = root / "captions" / f"cap.{c}.{split}.json"
        entries = _as_list(_load_json(path), path)
        for i, e in enumerate(validate_entries(FashionIQEntry, entries, path)):
            if e.target is None and ("fashioniq", split) not in HIDDEN_SPLITS:
                raise DataError(f"{path}: entry {i}: field 'target' is missing or null; expected the target's ASIN "
                                f"(only the hidden test split has none)")
            # the benchmark's "{c1} and {c2}", without the empty parts
            parts = [cap.strip() for cap in e.captions if not is_blank(cap)]
            if not parts:
                raise DataError(f"{path}: entry {i}: field 'captions': both captions are empty; "
                                f"expected at least one modification text")
            rows.append({
                "query_id": f"{c}-{split}-{i:05d}", "dataset": "fashioniq", "split": split, "category": c,
                "reference_id": e.candidate, "modification": " and ".join(parts),
                "target_ids": [e.target] if e.target else [],
            })
        split_path = root / "image_splits" / f"split.{c}.{split}.json"
        asins = _as_list(_load_json(split_path), split_path)
        for k, asin in enumerate(asins):
            if not isinstance(asin, str) or not asin:
                raise DataError(f"{split_path}: entry {k}: expected an image ASIN (a string), got {asin!r}")
            images.append({"image_id": asin, "dataset": "fashioniq", "split": split, "category": c,
                           "path": _fashioniq_image_path(root, asin, on_disk)})
    return Benchmark(triplets_frame(rows), images_frame(images))


def _circo_image_dir(root: Path) -> tuple[Path, str]:
    for rel in ("COCO2017_unlabeled/unlabeled2017", "unlabeled2017"):
        if (root / rel).is_dir():
            return root / rel, rel
    return root / "COCO2017_unlabeled/unlabeled2017", "COCO2017_unlabeled/unlabeled2017"


def read_circo(root: Path, split: str, category: str | None = None) -> Benchmark:
    path = root / "annotations" / f"{split}.json"
    entries = _as_list(_load_json(path), path)
    rows = []
    for i, e in enumerate(validate_entries(CircoEntry, entries, path)):
        gt = e.gt_img_ids or ([e.target_img_id] if e.target_img_id is not None else [])
        if not gt and ("circo", split) not in HIDDEN_SPLITS:
            raise DataError(f"{path}: entry {i} (id {e.id}): fields 'gt_img_ids' and 'target_img_id' are missing or "
                            f"empty; expected the ground-truth image ids (only the hidden test split has none)")
        rows.append({
            "query_id": f"{split}-{e.id}", "dataset": "circo", "split": split,
            "reference_id": str(e.reference_img_id), "modification": e.relative_caption,
            "target_ids": [str(g) for g in gt], "shared_concept": e.shared_concept,
        })
    triplets = triplets_frame(rows)
    image_dir, rel = _circo_image_dir(root)
    info = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    if info.is_file():
        ids = [str(im.id) for im in validate(CircoImageInfo, _load_json(info), info).images]
    elif image_dir.is_dir():
        names = os.listdir(image_dir)
        coco = [f for f in names if _COCO_NAME.fullmatch(f)]
        if len(coco) < len(names):
            stray = sorted(set(names) - set(coco))
            log.warning("circo: %d files in %s are not COCO images (<12 digits>.jpg) and are left out of the "
                        "gallery, e.g. %s", len(stray), image_dir, ", ".join(stray[:3]))
        ids = sorted(str(int(f[:-4])) for f in coco)
    else:  # no gallery on disk: the images the queries name
        named = set(triplets["reference_id"])
        for ids_ in triplets["target_ids"]:
            named.update(ids_)
        ids = sorted(named, key=int)
    images = [{"image_id": i, "dataset": "circo", "split": split, "path": f"{rel}/{int(i):012d}.jpg"} for i in ids]
    return Benchmark(triplets, images_frame(images))


def _check_paths(name: str, images: pd.DataFrame) -> None:
    """Every image path is relative and stays inside the dataset root (no ``..`` out of it)."""
    for image_id, rel in zip(images["image_id"], images["path"]):
        norm = os.path.normpath(str(rel))
        if os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
            raise DataError(f"{name}: image {image_id!r} has the path {rel!r}, which leaves the dataset root; "
                            f"image paths must be relative paths inside it")


def read_benchmark(name: str, root: str | os.PathLike, split: str, *, category: str | None = None,
                   require_images: bool = True) -> Benchmark:
    """Read one split of a benchmark into the normalised ``triplets`` and ``images`` tables.

    ``category`` selects one FashionIQ category (all three when None). With ``require_images``
    every image of the gallery and every image a query names must exist, else one
    :class:`MissingImagesError` lists them; nothing is silently dropped. Splits that hide their
    targets read with empty ``target_ids``.
    """
    _check_split(name, split)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{name}: dataset root {root} does not exist")
    bench = BENCHMARKS[name].read(root, split, category)
    _check_paths(name, bench.images)
    if require_images:
        _check_images(name, root, bench.images, bench.triplets)
    return bench


def available_splits(name: str, root: str | os.PathLike, *, category: str | None = None) -> list[str]:
    """The splits of ``name`` whose annotation files exist under ``root``."""
    root = Path(root)
    found = []
    for split in SPLITS[name]:
        if name == "synthetic":
            files = [root / "captions" / f"cap.{split}.json"]
        elif name == "cirr":
            files = [_cirr_annotation_dir(root) / "captions" / f"cap.rc2.{split}.json"]
        elif name == "fashioniq":
            cats = FASHIONIQ_CATEGORIES if category is None else (category,)
            files = [root / "captions" / f"cap.{c}.{split}.json" for c in cats]
        else:
            files = [root / "annotations" / f"{split}.json"]
        if all(f.is_file() for f in files):
            found.append(split)
    return found


def read_dataset(name: str, root: str | os.PathLike, splits: Iterable[str] | None = None, *,
                 category: str | None = None, require_images: bool = True) -> Benchmark:
    """All (or the given) splits of a benchmark in one pair of tables."""
    splits = list(splits) if splits is not None else available_splits(name, root, category=category)
    if not splits:
        raise DataError(f"{name}: no annotation files of any split ({', '.join(SPLITS[name])}) under {root}")
    parts = [read_benchmark(name, root, s, category=category, require_images=require_images) for s in splits]
    return Benchmark(pd.concat([p.triplets for p in parts], ignore_index=True),
                     pd.concat([p.images for p in parts], ignore_index=True))


def annotation_files(name: str, root: str | os.PathLike) -> list[Path]:
    """The annotation files of a benchmark (not its images): what identifies a version of it."""
    root = Path(root)
    if name == "cirr":
        root = _cirr_annotation_dir(root)
    folders = {"circo": ("annotations",)}.get(name, ("captions", "image_splits"))
    files = sorted(p for d in folders for p in (root / d).glob("*.json"))
    if name == "circo":
        info = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
        files += [info] if info.is_file() else []
    return files
