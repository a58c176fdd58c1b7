"""The official annotation formats of the benchmarks, as pydantic models.

Each reader validates every entry of a file against its model before using it, so a wrong type (a
null target, ``gt_img_ids`` a number, ``img_set`` a list, a caption that is a number, ...) becomes
one :class:`~model_code.data.tables.DataError` that names the file, the entry, the field and what
was expected, instead of a TypeError deep in the reader. Fields the readers do not use are allowed
and kept unchecked.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from model_code.data.tables import DataError


class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow")


class CirrImageSet(_Entry):
    id: StrictInt
    members: list[StrictStr]


class CirrEntry(_Entry):
    pairid: StrictInt
    reference: StrictStr
    caption: StrictStr
    target_hard: StrictStr | None = None           # absent in the hidden test1 split
    target_soft: dict[StrictStr, StrictFloat | StrictInt] | None = None
    img_set: CirrImageSet


class FashionIQEntry(_Entry):
    candidate: StrictStr
    target: StrictStr | None = None                # absent in the hidden test split
    captions: list[StrictStr] = Field(min_length=2, max_length=2)


class CircoEntry(_Entry):
    id: StrictInt
    reference_img_id: StrictInt
    relative_caption: StrictStr
    target_img_id: StrictInt | None = None         # absent in the hidden test split
    gt_img_ids: list[StrictInt] | None = None
    shared_concept: StrictStr | None = None


class CircoImage(_Entry):
    id: StrictInt


class CircoImageInfo(_Entry):
    images: list[CircoImage]


class SyntheticEntry(_Entry):
    query_id: StrictStr
    reference: StrictStr
    target: StrictStr
    modification: StrictStr
    n_edits: StrictInt | None = None
    reference_dependent: StrictBool | None = None
    hard_negatives: list[StrictStr] = []


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
