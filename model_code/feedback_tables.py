"""The feedback set: one dataset's feedback triplets (model_code/feedback.py), versioned and checked
like any data (docs/feedback.md).

- :func:`leakage_guard`: what the leakage guard knows of the dataset's triplets tables: every image
  id and its split, the ids and content hashes (md5 of the bytes) of every image outside the train
  split (held out: a query whose reference or target is one of them never becomes training data,
  so no test split ever sees feedback), and the hashes of the train images (an uploaded reference
  that is one of them is named by its id). Hashes are cached between runs by path, size and time.
- :func:`write_feedback_tables`: a version folder's ``triplets.parquet`` and ``images.parquet``
  (the contract's schema, docs/architecture.md §4) with the new reference images copied into
  ``images/``: the images table holds only those, its paths relative to the version folder; every
  other id is an image of the dataset's triplets tables (:class:`FeedbackRecord` ``tables_folder``,
  paths relative to ``root``). ``annotations.parquet`` lies beside them.
- :func:`read_feedback_tables`: the tables with absolute image paths (what training reads).
- :func:`verify_feedback`: what the blocking check finds wrong in a version: an id the gallery does
  not hold, a text out of limits, a held-out image by id or by content.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pydantic

from model_code.common import atomic_write_json, file_md5
from model_code.data import DataError, read_tables, write_tables
from model_code.data.tables import Benchmark, image_paths, images_frame, triplets_frame
from model_code.records import Record
from model_code.retrieval import MAX_TEXT_CHARS

TRAIN_SPLIT = "train"          # feedback becomes training data of this split only
NEW_PREFIX = "fb-"             # a reference that is no image of the benchmark: fb-<md5 of its bytes>


class DigestCache:
    """md5 of files' bytes, kept in a JSON file by path with the size and modification time it was
    computed for (a file replaced or edited is read again)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        self.entries: dict[str, list] = {}
        self.changed = False
        if self.path and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except ValueError:
                self.entries = {}    # a damaged cache is rebuilt

    def __call__(self, file: str | os.PathLike) -> str | None:
        """The file's md5, or None when it does not exist."""
        try:
            st = os.stat(file)
        except FileNotFoundError:
            return None
        entry = self.entries.get(str(file))
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        md5 = file_md5(file)
        self.entries[str(file)] = [st.st_size, st.st_mtime_ns, md5]
        self.changed = True
        return md5

    def save(self) -> None:
        if self.path and self.changed:
            atomic_write_json(self.path, self.entries, indent=None)
            self.changed = False


@dataclasses.dataclass
class LeakageGuard:
    gallery: dict[str, str]            # image id -> split (a held-out split where an id is in several)
    held_out_ids: set[str]             # every image outside the train split
    held_out_hashes: set[str]          # their content hashes
    known_hashes: dict[str, str]       # content hash -> id of a train image
    train_hashes: dict[str, str]       # train image id -> its content hash

    def collect_kwargs(self) -> dict:
        """The arguments of :func:`model_code.feedback.collect_triplets` this guard gives."""
        return {"gallery": self.gallery, "held_out_ids": self.held_out_ids,
                "held_out_hashes": self.held_out_hashes, "known_hashes": self.known_hashes}


def leakage_guard(images: pd.DataFrame, root: str | os.PathLike,
                  cache: str | os.PathLike | None = None) -> LeakageGuard:
    """The guard of a dataset whose images table is ``images`` (paths relative to ``root``). Every
    held-out image must be on disk (its content is what the guard compares an upload with); a
    missing train image is only not recognised."""
    digests = DigestCache(cache)
    gallery: dict[str, str] = {}
    for image_id, split in zip(images["image_id"], images["split"]):
        if split != TRAIN_SPLIT or image_id not in gallery:
            gallery[image_id] = split
    held_out_ids = {i for i, s in gallery.items() if s != TRAIN_SPLIT}
    held_out_hashes, train_hashes, missing = set(), {}, []
    for (split, image_id), path in image_paths(images, root).items():
        md5 = digests(path)
        if split != TRAIN_SPLIT:
            if md5 is None:
                missing.append(str(path))
            else:
                held_out_hashes.add(md5)
        elif md5 is not None and image_id not in held_out_ids:
            train_hashes[image_id] = md5
    digests.save()
    if missing:
        raise DataError(f"the leakage guard compares uploads with every held-out image by content, and {len(missing)} "
                        f"are missing (first: {missing[0]}): put the dataset's images in place")
    known: dict[str, str] = {}
    for image_id, md5 in train_hashes.items():
        if md5 not in held_out_hashes:
            known.setdefault(md5, image_id)
    return LeakageGuard(gallery, held_out_ids, held_out_hashes, known, train_hashes)


def write_feedback_tables(folder: str | os.PathLike, triplets: list[dict], images: list[dict]) -> Benchmark:
    """Write a version's tables into ``folder`` (the rows of ``collect_triplets``), with copies of
    the new reference images under ``images/``. Returns the tables as written."""
    folder = Path(folder)
    rows = []
    for image in images:
        source = Path(image["path"])
        name = f"images/{source.name}"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / name)
        rows.append({**image, "path": name})
    bench = Benchmark(triplets_frame(triplets), images_frame(rows))
    write_tables(bench, folder)
    return bench


def read_feedback_tables(folder: str | os.PathLike) -> Benchmark:
    """A version's tables, the new reference images' paths absolute."""
    folder = Path(folder)
    bench = read_tables(folder)
    images = bench.images.assign(path=[str(folder / p) for p in bench.images["path"]])
    return Benchmark(bench.triplets, images)


class FeedbackRecord(Record):
    """What the ``feedback_triplets`` stage hands on (``meta.json`` in the version folder, and the
    asset's ``record`` metadata)."""

    dataset: str
    folder: str                  # triplets.parquet, images.parquet, images/, annotations.parquet
    version: str                 # content hash of those files
    tables_folder: str           # the triplets tables whose images the ids name (a TablesRecord folder)
    tables_version: str
    root: str                    # the raw dataset root (the tables' image paths are relative to it)
    raw_version: str
    teacher: str = ""            # the annotator of the chains ("" when there was nothing to annotate)
    prompt_version: str = ""
    cap_per_token: int = 0
    report: dict = pydantic.Field(default_factory=dict)   # collect_triplets' counts
    triplets: int = 0
    new_images: int = 0
    annotated_ok: int = 0
    annotated_rejected: int = 0
    person_chains: int = 0       # of annotated_ok: chains a person wrote (a correction, then a pick), not a teacher
    person_rejected: int = 0     # people's chains that failed the rules (kept as rejections, not trained on)

    META: ClassVar[str] = "meta.json"

    @property
    def annotations(self) -> Path:
        return Path(self.folder) / "annotations.parquet"


def verify_feedback(folder: str | os.PathLike, dataset: str, guard: LeakageGuard,
                    max_chars: int = MAX_TEXT_CHARS) -> list[tuple[str, str]]:
    """``(kind, message)`` for each problem of the version in ``folder``: ``id`` (not in the gallery,
    nor a new reference whose file holds the bytes its name says), ``text`` (empty, over
    ``max_chars``), ``leak`` (a held-out image by id or content), ``table`` (split, dataset,
    duplicates, annotations of no triplet). Empty: the version may be trained on."""
    folder = Path(folder)
    bench = read_tables(folder)
    problems: list[tuple[str, str]] = []
    new: dict[str, str | None] = {}
    for image_id, split, path in zip(bench.images["image_id"], bench.images["split"], bench.images["path"]):
        if split != TRAIN_SPLIT:
            problems.append(("table", f"image {image_id}: split {split!r}, not {TRAIN_SPLIT!r}"))
        file = folder / path
        md5 = file_md5(file) if file.is_file() else None
        new[image_id] = md5
        if md5 is None:
            problems.append(("id", f"image {image_id}: its file {path} is missing"))
        elif image_id != NEW_PREFIX + md5:
            problems.append(("id", f"image {image_id}: its file's content hash is {md5}"))
        if md5 is not None and md5 in guard.held_out_hashes:
            problems.append(("leak", f"image {image_id} is a held-out image (same content)"))

    def check_ids(query: str, role: str, ids) -> None:
        for i in ids:
            if i in guard.held_out_ids:
                problems.append(("leak", f"{query}: {role} {i} is a held-out image"))
            elif i not in guard.gallery and (role != "reference" or i not in new):
                problems.append(("id", f"{query}: {role} {i} is not an image of the gallery"))

    t = bench.triplets
    for q in t["query_id"][t["query_id"].duplicated()].unique():
        problems.append(("table", f"{q}: query id used twice"))
    for row in t.itertuples(index=False):
        q = row.query_id
        if row.split != TRAIN_SPLIT:
            problems.append(("table", f"{q}: split {row.split!r}, not {TRAIN_SPLIT!r}"))
        if row.dataset != dataset:
            problems.append(("table", f"{q}: dataset {row.dataset!r}, not {dataset!r}"))
        text = row.modification if isinstance(row.modification, str) else ""
        if not text.strip():
            problems.append(("text", f"{q}: empty modification"))
        elif len(text) > max_chars:
            problems.append(("text", f"{q}: modification of {len(text)} characters (at most {max_chars})"))
        check_ids(q, "reference", [row.reference_id])
        md5 = new.get(row.reference_id) or guard.train_hashes.get(row.reference_id)
        if md5 is not None and md5 in guard.held_out_hashes and row.reference_id not in new:
            problems.append(("leak", f"{q}: reference {row.reference_id} has the content of a held-out image"))
        if not len(row.target_ids):
            problems.append(("id", f"{q}: no target"))
        check_ids(q, "target", row.target_ids)
        check_ids(q, "hard negative", row.hard_negative_ids)
    annotations = folder / "annotations.parquet"
    if annotations.is_file():
        stray = set(pd.read_parquet(annotations, columns=["query_id"])["query_id"]) - set(t["query_id"])
        problems += [("table", f"annotation of {q}, which is no triplet of this version") for q in sorted(stray)]
    return problems
