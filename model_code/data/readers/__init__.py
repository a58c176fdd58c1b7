"""Reading any benchmark into the normalised tables of docs/architecture.md §4.

``read_benchmark(spec, root, split)`` returns ``Benchmark(triplets, images)``. What a benchmark's
official files look like is known only to its own module (``BenchmarkSpec.module``:
``model_code/data/readers/<name>.py``), which provides ``read(spec, root, split, category)``,
``split_files(spec, root, split, category)`` (the files that make a split present: the layout check)
and ``annotation_files(spec, root)`` (what versions it), and, where an evaluation server scores a
hidden split, ``submissions(...)``. What this module adds is the same for every benchmark: the
split and path checks and the check that every image is on disk.

The tables themselves (columns, Parquet) are in ``model_code/data/tables.py``; the JSON loading and
entry validation the benchmark modules share in ``model_code/data/formats.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from model_code.benchmarks import BenchmarkSpec, UnknownBenchmarkError, benchmark
from model_code.data.tables import LIST_COLUMNS, Benchmark, DataError, MissingImagesError


def _spec(name: str | BenchmarkSpec) -> BenchmarkSpec:
    try:
        return benchmark(name)
    except UnknownBenchmarkError as e:
        raise DataError(str(e)) from None


def _check_images(spec: BenchmarkSpec, root: Path, images: pd.DataFrame, triplets: pd.DataFrame) -> None:
    """Every gallery image and every image a query names must exist under ``root``."""
    paths = dict(zip(images["image_id"], images["path"]))
    named = set(triplets["reference_id"])
    for col in LIST_COLUMNS:
        for ids in triplets[col]:
            named.update(ids)
    missing = sorted(i for i in named if i not in paths)
    missing += sorted(i for i, p in paths.items() if not (root / p).is_file())
    if missing:
        raise MissingImagesError(spec.name, root, missing, len(set(paths) | named))


def _check_paths(spec: BenchmarkSpec, images: pd.DataFrame) -> None:
    """Every image path is relative and stays inside the dataset root (no ``..`` out of it)."""
    for image_id, rel in zip(images["image_id"], images["path"]):
        norm = os.path.normpath(str(rel))
        if os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
            raise DataError(f"{spec.name}: image {image_id!r} has the path {rel!r}, which leaves the dataset root; "
                            f"image paths must be relative paths inside it")


def read_benchmark(name: str | BenchmarkSpec, root: str | os.PathLike, split: str, *, category: str | None = None,
                   require_images: bool = True) -> Benchmark:
    """Read one split of a benchmark (its spec, or its name) into the normalised ``triplets`` and
    ``images`` tables.

    ``category`` selects one category (FashionIQ's garments; all when None). With
    ``require_images`` every image of the gallery and every image a query names must exist, else one
    :class:`MissingImagesError` lists them; nothing is silently dropped. Splits that hide their
    targets read with empty ``target_ids``.
    """
    spec = _spec(name)
    if split not in spec.splits:
        raise DataError(f"{spec.name} has no split {split!r}; its splits: {', '.join(spec.splits)}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{spec.name}: dataset root {root} does not exist")
    bench = spec.read(root, split, category)
    _check_paths(spec, bench.images)
    if require_images:
        _check_images(spec, root, bench.images, bench.triplets)
    return bench


def available_splits(name: str | BenchmarkSpec, root: str | os.PathLike, *, category: str | None = None) -> list[str]:
    """The splits of a benchmark whose annotation files exist under ``root``."""
    spec, root = _spec(name), Path(root)
    return [split for split in spec.splits if all(f.is_file() for f in spec.split_files(root, split, category))]


def read_dataset(name: str | BenchmarkSpec, root: str | os.PathLike, splits: Iterable[str] | None = None, *,
                 category: str | None = None, require_images: bool = True) -> Benchmark:
    """All (or the given) splits of a benchmark in one pair of tables."""
    spec = _spec(name)
    splits = list(splits) if splits is not None else available_splits(spec, root, category=category)
    if not splits:
        raise DataError(f"{spec.name}: no annotation files of any split ({', '.join(spec.splits)}) under {root}")
    parts = [read_benchmark(spec, root, s, category=category, require_images=require_images) for s in splits]
    return Benchmark(pd.concat([p.triplets for p in parts], ignore_index=True),
                     pd.concat([p.images for p in parts], ignore_index=True))


def annotation_files(name: str | BenchmarkSpec, root: str | os.PathLike) -> list[Path]:
    """The annotation files of a benchmark (not its images): what identifies a version of it."""
    return _spec(name).annotation_files(Path(root))
