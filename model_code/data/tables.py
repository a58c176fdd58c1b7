"""The normalised tables of docs/architecture.md §4 (triplets, images) as pandas frames and Parquet files.

``Benchmark(triplets, images)`` is what every reader returns; :func:`write_tables` /
:func:`read_tables` store it with the contract's Arrow schema. Columns beyond the contract, all
optional and null where a benchmark has no such notion: ``triplets.n_edits``,
``triplets.reference_dependent`` and ``triplets.hard_negative_ids`` (synthetic), ``images.category``
(FashionIQ).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import ClassVar, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic

from model_code.benchmarks import BENCHMARKS
from model_code.common import atomic_path
from model_code.records import Record

# views of the benchmarks' specs (model_code.benchmarks), the one place these facts are kept
DATASETS = tuple(BENCHMARKS)
SPLITS = {name: spec.splits for name, spec in BENCHMARKS.items()}
# Splits whose targets the benchmark authors withhold (scored by their evaluation servers).
HIDDEN_SPLITS = frozenset((name, split) for name, spec in BENCHMARKS.items() for split in spec.hidden_splits)

TRIPLET_COLUMNS = ["query_id", "dataset", "split", "category", "reference_id", "modification", "target_ids",
                   "subset_ids", "shared_concept", "n_edits", "reference_dependent", "hard_negative_ids"]
IMAGE_COLUMNS = ["image_id", "dataset", "split", "path", "category"]
LIST_COLUMNS = ("target_ids", "subset_ids", "hard_negative_ids")


class Benchmark(NamedTuple):
    triplets: pd.DataFrame
    images: pd.DataFrame


class DataError(ValueError):
    """A benchmark's files are missing or do not follow its layout."""


class MissingImagesError(DataError):
    """Images named by the annotations are not on disk."""

    def __init__(self, dataset: str, root: Path, missing: list[str], total: int):
        self.dataset, self.root, self.missing, self.total = dataset, root, missing, total
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        super().__init__(
            f"{dataset}: {len(missing)} of {total} images are missing under {root} (first: {shown}). "
            f"Download the benchmark's images into that folder, or read the annotations alone with "
            f"require_images=False.")



def nulls_as_none(df: pd.DataFrame) -> pd.DataFrame:
    """Every column as Python objects with None for missing values (pandas' NaN/NA otherwise)."""
    return df.astype(object).where(df.notna(), None)


def triplets_frame(rows: list[dict]) -> pd.DataFrame:
    return normalise_triplets(pd.DataFrame(rows, columns=TRIPLET_COLUMNS))


def _id_list(value):
    """Lists (and the arrays Parquet reads back) as Python lists, nulls as []; anything else is
    kept as it is for the quality suite to report."""
    if value is None or (isinstance(value, float) and value != value):
        return []
    if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and not isinstance(value, str)):
        return list(value)
    return value


def normalise_triplets(df: pd.DataFrame) -> pd.DataFrame:
    """One in-memory form however the table was made: lists as Python lists, nulls as None."""
    for col in LIST_COLUMNS:   # object dtype even when empty (a float column of no rows is no list column)
        df[col] = pd.Series([_id_list(v) for v in df[col]], index=df.index, dtype=object)
    df["n_edits"] = df["n_edits"].astype("Int64")
    df["reference_dependent"] = df["reference_dependent"].astype("boolean")
    df[["category", "shared_concept"]] = nulls_as_none(df[["category", "shared_concept"]])
    return df


def image_paths(images: pd.DataFrame, root: str | os.PathLike = "") -> dict[tuple[str, str], Path]:
    """(split, image id) -> the image file under ``root`` (the images table's paths are relative to it)."""
    root = Path(root)
    return {(s, i): root / p for s, i, p in zip(images["split"], images["image_id"], images["path"])}


def images_frame(rows: list[dict]) -> pd.DataFrame:
    return normalise_images(pd.DataFrame(rows, columns=IMAGE_COLUMNS))


def normalise_images(df: pd.DataFrame) -> pd.DataFrame:
    df[["category"]] = nulls_as_none(df[["category"]])
    return df



# ---------------------------------------------------------------------------------------------
# Parquet with the contract's schema


def _schemas():
    strs = pa.list_(pa.string())
    triplets = pa.schema([("query_id", pa.string()), ("dataset", pa.string()), ("split", pa.string()),
                          ("category", pa.string()), ("reference_id", pa.string()), ("modification", pa.string()),
                          ("target_ids", strs), ("subset_ids", strs), ("shared_concept", pa.string()),
                          ("n_edits", pa.int64()), ("reference_dependent", pa.bool_()), ("hard_negative_ids", strs)])
    images = pa.schema([("image_id", pa.string()), ("dataset", pa.string()), ("split", pa.string()),
                        ("path", pa.string()), ("category", pa.string())])
    return triplets, images


def write_tables(bench: Benchmark, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``triplets.parquet`` and ``images.parquet`` (atomically) with the contract's schema."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, df, schema in zip(("triplets", "images"), bench, _schemas()):
        table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
        path = out_dir / f"{name}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        written[name] = path
    return written


def read_tables(out_dir: str | os.PathLike) -> Benchmark:
    """Read tables written by :func:`write_tables` back into pandas (lists as Python lists)."""
    out_dir = Path(out_dir)
    return Benchmark(normalise_triplets(pq.read_table(out_dir / "triplets.parquet").to_pandas()),
                     normalise_images(pq.read_table(out_dir / "images.parquet").to_pandas()))


class TablesRecord(Record):
    """What the ``triplets`` stage hands on: where the tables are and what they were built from.
    Written as ``meta.json`` beside the tables and carried in the asset's metadata."""

    dataset: str
    folder: str                 # holds triplets.parquet, images.parquet, meta.json
    root: str                   # the raw dataset root (image paths are relative to it)
    raw_version: str            # the raw data's version (DVC hash, or md5 of the annotation files)
    version: str = ""           # content hash of the two tables
    require_images: bool = True
    category: str | None = None
    queries: dict = pydantic.Field(default_factory=dict)   # split -> count
    images: dict = pydantic.Field(default_factory=dict)    # split -> count

    META: ClassVar[str] = "meta.json"

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TablesRecord:
        """The record of a tables folder (its ``meta.json``)."""
        path = Path(folder) / cls.META
        if not path.is_file():
            raise DataError(f"{folder} holds no tables written by the pipeline ({cls.META} missing)")
        return cls.read(path)
