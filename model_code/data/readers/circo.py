"""CIRCO (Baldrati et al., ICCV 2023): its reader and its evaluation server's file.

Layout: ``annotations/<split>.json`` and the COCO 2017 unlabeled gallery at
``COCO2017_unlabeled/unlabeled2017/<12-digit id>.jpg`` (or ``unlabeled2017/`` under the root),
listed by ``COCO2017_unlabeled/annotations/image_info_unlabeled2017.json`` when present. The query
text is the entry's ``relative_caption``; its ``gt_img_ids`` are the (several) ground truths.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from pydantic import StrictInt, StrictStr

from model_code.data.formats import Entry, as_list, load_json, validate, validate_entries
from model_code.data.tables import Benchmark, DataError, images_frame, triplets_frame

log = logging.getLogger(__name__)
_COCO_NAME = re.compile(r"\d{12}\.jpg")
_INFO = Path("COCO2017_unlabeled") / "annotations" / "image_info_unlabeled2017.json"


class CircoEntry(Entry):
    id: StrictInt
    reference_img_id: StrictInt
    relative_caption: StrictStr
    target_img_id: StrictInt | None = None         # absent in the hidden test split
    gt_img_ids: list[StrictInt] | None = None
    shared_concept: StrictStr | None = None


class CircoImage(Entry):
    id: StrictInt


class CircoImageInfo(Entry):
    images: list[CircoImage]


def _image_dir(root: Path) -> tuple[Path, str]:
    for rel in ("COCO2017_unlabeled/unlabeled2017", "unlabeled2017"):
        if (root / rel).is_dir():
            return root / rel, rel
    return root / "COCO2017_unlabeled/unlabeled2017", "COCO2017_unlabeled/unlabeled2017"


def read(spec, root: Path, split: str, category: str | None = None) -> Benchmark:
    path = root / "annotations" / f"{split}.json"
    entries = as_list(load_json(path), path)
    rows = []
    for i, e in enumerate(validate_entries(CircoEntry, entries, path)):
        gt = e.gt_img_ids or ([e.target_img_id] if e.target_img_id is not None else [])
        if not gt and split not in spec.hidden_splits:
            raise DataError(f"{path}: entry {i} (id {e.id}): fields 'gt_img_ids' and 'target_img_id' are missing or "
                            f"empty; expected the ground-truth image ids (only the hidden test split has none)")
        rows.append({
            "query_id": f"{split}-{e.id}", "dataset": spec.name, "split": split,
            "reference_id": str(e.reference_img_id), "modification": e.relative_caption,
            "target_ids": [str(g) for g in gt], "shared_concept": e.shared_concept,
        })
    triplets = triplets_frame(rows)
    image_dir, rel = _image_dir(root)
    info = root / _INFO
    if info.is_file():
        ids = [str(im.id) for im in validate(CircoImageInfo, load_json(info), info).images]
    elif image_dir.is_dir():
        names = os.listdir(image_dir)
        coco = [f for f in names if _COCO_NAME.fullmatch(f)]
        if len(coco) < len(names):
            stray = sorted(set(names) - set(coco))
            log.warning("%s: %d files in %s are not COCO images (<12 digits>.jpg) and are left out of the "
                        "gallery, e.g. %s", spec.name, len(stray), image_dir, ", ".join(stray[:3]))
        ids = sorted(str(int(f[:-4])) for f in coco)
    else:  # no gallery on disk: the images the queries name
        named = set(triplets["reference_id"])
        for ids_ in triplets["target_ids"]:
            named.update(ids_)
        ids = sorted(named, key=int)
    images = [{"image_id": i, "dataset": spec.name, "split": split, "path": f"{rel}/{int(i):012d}.jpg"} for i in ids]
    return Benchmark(triplets, images_frame(images))


def split_files(spec, root: Path, split: str, category: str | None = None) -> list[Path]:
    return [root / "annotations" / f"{split}.json"]


def annotation_files(spec, root: Path) -> list[Path]:
    files = sorted((root / "annotations").glob("*.json"))
    return files + ([root / _INFO] if (root / _INFO).is_file() else [])


def submissions(spec, split: str, method: str, rankings: dict, subset_rankings: dict,
                query_ids: list[str]) -> dict[str, dict]:
    """CIRCO's evaluation server file: the top 50 image ids keyed by the query id of its annotation file."""
    prefix = f"{split}-"
    return {f"{spec.name}_{split}_{method}.json": {qid.removeprefix(prefix): rankings[qid][:50] for qid in query_ids}}
