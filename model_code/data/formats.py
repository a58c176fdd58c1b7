"""Reading the benchmarks' official annotation files: JSON loading and the check of every entry.

Each benchmark's module (``model_code/data/readers/<name>.py``) declares its entries as pydantic
models (subclasses of :class:`Entry`) and validates every entry of a file before using it, so a wrong type (a
null target, ``gt_img_ids`` a number, ``img_set`` a list, a caption that is a number, ...) becomes
one :class:`~model_code.data.tables.DataError` that names the file, the entry, the field and what
was expected, instead of a TypeError deep in the reader. Fields the readers do not use are allowed
and kept unchecked.
"""

from __future__ import annotations

from pathlib import Path

import json

from pydantic import BaseModel, ConfigDict, ValidationError

from model_code.data.tables import DataError


class Entry(BaseModel):
    """An entry of an official annotation file; fields a reader does not use are allowed and kept."""

    model_config = ConfigDict(extra="allow")


def _describe(error: dict) -> str:
    field = ".".join(str(p) for p in error["loc"]) or "(the entry itself)"
    got = error.get("input")
    if error["type"] == "missing":
        return f"has no field '{field}'" + (f" (has: {sorted(got)})" if isinstance(got, dict) else "")
    shown = "null" if got is None else repr(got)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"field '{field}': {error['msg'].lower()} (got {shown} of type {type(got).__name__})"


def validate(model: type[BaseModel], value, path: Path, entry: int | str | None = None):
    """``value`` as ``model``, or a DataError naming the file, the entry and each wrong field."""
    try:
        return model.model_validate(value)
    except ValidationError as e:
        where = f"{path}" + (f": entry {entry}" if entry is not None else "")
        problems = "; ".join(_describe(err) for err in e.errors()[:3])
        more = f" (and {len(e.errors()) - 3} more)" if len(e.errors()) > 3 else ""
        raise DataError(f"{where}: {problems}{more}; expected the {model.__name__} format") from None


def validate_entries(model: type[BaseModel], entries: list, path: Path) -> list:
    return [validate(model, e, path, i) for i, e in enumerate(entries)]


def load_json(path: Path):
    """The content of a JSON annotation file, or a DataError naming the file."""
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None


def as_list(entries, path: Path) -> list:
    """``entries`` when it is a JSON list, else a DataError naming the file."""
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    return entries


def captions_and_split(ann: Path, stem: str) -> tuple[Path, list, dict]:
    """The CIRR-style pair ``captions/cap.<stem>.json`` (entries) and ``image_splits/split.<stem>.json``
    (image name -> relative path) under ``ann``: the captions file's path, its entries, the image paths."""
    path = ann / "captions" / f"cap.{stem}.json"
    entries = as_list(load_json(path), path)
    split_path = ann / "image_splits" / f"split.{stem}.json"
    paths = load_json(split_path)
    if not isinstance(paths, dict):
        raise DataError(f"{split_path}: expected a JSON object of image name -> path, got {type(paths).__name__}")
    for name, rel in paths.items():
        if not isinstance(rel, str) or not rel:
            raise DataError(f"{split_path}: entry {name!r}: expected a relative image path (a string), got {rel!r}")
    return path, entries, paths


def clean_path(rel: str) -> str:
    """A relative path as the images table keeps it (no leading ``./``)."""
    return rel[2:] if rel.startswith("./") else rel
