"""Data-quality suites (Great Expectations 1.x) for the normalised tables.

``validate_triplets(triplets, images)`` and ``validate_images(images, root)`` run a suite on an
ephemeral GX context and return a :class:`QualityReport`: which expectation failed, on how many
rows, and example rows (by query or image id). ``report.raise_for_failure()`` turns a failed report
into a :class:`DataQualityError` whose message is that readable report.

Columns that GX cannot check directly (lists, files on disk) are turned into derived columns first:
lists summarised by what is wrong with them, list members exploded into one row each, files
probed into a status, width and height.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image

from model_code.chain import is_blank, visible_pattern
from model_code.data import HIDDEN_SPLITS, LIST_COLUMNS, SPLITS, nulls_as_none

# great_expectations: imported where used (slow to import; the Dagster definitions load this module)

MAX_EXAMPLES = 5
IMAGE_SIDE_BOUNDS = (16, 8192)


class DataQualityError(ValueError):
    """A table failed its data-quality suite; ``report`` says how."""

    def __init__(self, report: QualityReport):
        self.report = report
        super().__init__(report.to_text())


@dataclasses.dataclass
class ExpectationOutcome:
    expectation: str          # GX expectation type, e.g. expect_column_values_to_be_unique
    column: str | None
    description: str          # what it means for our data
    success: bool
    element_count: int
    unexpected_count: int
    examples: list[dict]      # example offending rows: id columns and the offending value
    error: str | None = None  # the expectation itself raised

    def line(self) -> str:
        mark = "ok  " if self.success else "FAIL"
        where = f"({self.column})" if self.column else ""
        text = f"[{mark}] {self.description} — {self.expectation}{where}"
        if self.error:
            return text + f": raised {self.error}"
        if not self.success:
            text += f": {self.unexpected_count} of {self.element_count} rows"
            for ex in self.examples:
                text += "\n         e.g. " + ", ".join(f"{k}={v!r}" for k, v in ex.items())
        return text


@dataclasses.dataclass
class QualityReport:
    suite: str
    outcomes: list[ExpectationOutcome]

    @property
    def success(self) -> bool:
        return all(o.success for o in self.outcomes)

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def to_text(self) -> str:
        head = (f"data-quality suite '{self.suite}': "
                + ("passed" if self.success else f"FAILED {len(self.failed)} of {len(self.outcomes)} expectations"))
        shown = self.failed + [o for o in self.outcomes if o.success]
        return "\n".join([head, *("  " + o.line() for o in shown)])

    def to_markdown(self) -> str:
        rows = ["| result | check | expectation | unexpected | examples |", "|---|---|---|---|---|"]
        for o in self.failed + [o for o in self.outcomes if o.success]:
            ex = "; ".join(", ".join(f"{k}={v}" for k, v in e.items()) for e in o.examples)
            ex = (o.error or ex).replace("|", "\\|").replace("\n", " ")
            col = f"({o.column})" if o.column else ""
            rows.append(f"| {'✅' if o.success else '❌'} | {o.description} | `{o.expectation}{col}` | "
                        f"{o.unexpected_count}/{o.element_count} | {ex} |")
        return "\n".join(rows)

    def raise_for_failure(self) -> None:
        if not self.success:
            raise DataQualityError(self)


# ---------------------------------------------------------------------------------------------
# running a suite on an ephemeral context


@dataclasses.dataclass
class Frame:
    name: str
    df: pd.DataFrame
    id_columns: list[str]
    checks: list[tuple[object, str]]  # (GX expectation, description)


def run_suite(suite_name: str, frames: Sequence[Frame]) -> QualityReport:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas(suite_name)
    outcomes = []
    for frame in frames:
        if not frame.checks:
            continue
        asset = source.add_dataframe_asset(frame.name)
        batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame.df})
        suite = gx.ExpectationSuite(name=f"{suite_name}.{frame.name}")
        descriptions = {}
        for i, (expectation, description) in enumerate(frame.checks):
            # GX does not keep the suite's order in its results: tag each expectation to find its own
            expectation.meta = {**(expectation.meta or {}), "circot_check": i}
            suite.add_expectation(expectation)
            descriptions[i] = description
        result = batch.validate(suite, result_format={"result_format": "COMPLETE",
                                                      "unexpected_index_column_names": frame.id_columns})
        ordered = sorted(result.results, key=lambda r: r.expectation_config.meta["circot_check"])
        for r in ordered:
            description = descriptions[r.expectation_config.meta["circot_check"]]
            kwargs = r.expectation_config.kwargs
            column = kwargs.get("column") or (",".join(kwargs["column_list"]) if "column_list" in kwargs else None)
            res = r.result or {}
            error = None
            if r.exception_info and r.exception_info.get("raised_exception"):
                error = r.exception_info.get("exception_message") or "exception"
            examples = [dict(e) for e in (res.get("unexpected_index_list") or [])[:MAX_EXAMPLES]]
            if not examples and res.get("partial_unexpected_list"):
                examples = [{column or "value": v} for v in res["partial_unexpected_list"][:MAX_EXAMPLES]]
            outcomes.append(ExpectationOutcome(
                expectation=r.expectation_config.type, column=column, description=description,
                success=bool(r.success) and error is None, element_count=int(res.get("element_count") or len(frame.df)),
                unexpected_count=int(res.get("unexpected_count") or 0), examples=examples, error=error))
    return QualityReport(suite_name, outcomes)


# ---------------------------------------------------------------------------------------------
# the suites


def _list_form(value) -> str:
    """'ok' for a list of distinct non-empty string ids, else what is wrong with it."""
    if not isinstance(value, list):
        return f"not a list: {type(value).__name__} {value!r:.60}"
    if not all(isinstance(v, str) for v in value):
        return f"non-string member in {value!r:.60}"
    if any(is_blank(v) for v in value):
        return f"empty id in {json.dumps(value):.60}"
    if len(set(value)) != len(value):
        return f"repeated id in {json.dumps(value):.60}"
    return "ok"


def _key(split: pd.Series, image_id: pd.Series) -> pd.Series:
    return split.astype(str) + ":" + image_id.astype(str)


def validate_triplets(triplets: pd.DataFrame, images: pd.DataFrame) -> QualityReport:
    """Unique non-null query ids, non-empty modifications, known splits, well-formed list columns,
    targets present wherever the split reveals them, and every image a query names (reference,
    targets, subset members, hard negatives) present in the images table of the same split."""
    import great_expectations as gx

    E = gx.expectations
    dataset = str(triplets["dataset"].iloc[0]) if len(triplets) else None
    known = sorted(SPLITS.get(dataset, {s for v in SPLITS.values() for s in v}))
    hidden = {s for d, s in HIDDEN_SPLITS if d == dataset}

    t = pd.DataFrame({
        "query_id": triplets["query_id"].astype(object),
        "split": triplets["split"].astype(object),
        "modification": triplets["modification"].astype(object),
        "reference_id": triplets["reference_id"].astype(object),
    })
    for col in LIST_COLUMNS:
        t[f"{col}_form"] = [_list_form(v) for v in triplets[col]]
    t["has_targets"] = [bool(s in hidden or (isinstance(v, list) and len(v) > 0))
                        for s, v in zip(triplets["split"], triplets["target_ids"])]
    t = nulls_as_none(t)

    named = []
    for q, split, ref, *lists in zip(triplets["query_id"], triplets["split"], triplets["reference_id"],
                                     *(triplets[c] for c in LIST_COLUMNS)):
        named.append((q, "reference", split, ref))
        for role, ids in zip(LIST_COLUMNS, lists):
            if isinstance(ids, list):
                named.extend((q, role, split, i) for i in ids if isinstance(i, str))
    n = pd.DataFrame(named, columns=["query_id", "role", "split", "image_id"], dtype=object)
    n["image_key"] = _key(n["split"], n["image_id"]) if len(n) else pd.Series([], dtype=object)
    image_keys = sorted(set(_key(images["split"], images["image_id"])))

    frames = [
        Frame("triplets", t, ["query_id"], [
            (E.ExpectColumnValuesToNotBeNull(column="query_id"), "every query has an id"),
            (E.ExpectColumnValuesToBeUnique(column="query_id"), "query ids are unique"),
            (E.ExpectColumnValuesToNotBeNull(column="modification"), "every query has a modification text"),
            (E.ExpectColumnValuesToMatchRegex(column="modification", regex=visible_pattern()),
             "modification texts are not empty"),
            (E.ExpectColumnValuesToNotBeNull(column="reference_id"), "every query has a reference image"),
            (E.ExpectColumnValuesToBeInSet(column="split", value_set=known), f"split is one of {', '.join(known)}"),
            *((E.ExpectColumnValuesToBeInSet(column=f"{c}_form", value_set=["ok"]),
               f"{c} is a list of distinct non-empty ids") for c in LIST_COLUMNS),
            (E.ExpectColumnValuesToBeInSet(column="has_targets", value_set=[True]),
             "queries name a target unless their split hides it"),
        ]),
        Frame("named_images", n, ["query_id", "role"], [
            (E.ExpectColumnValuesToBeInSet(column="image_key", value_set=image_keys),
             "every image a query names is in the images table of its split"),
        ]),
    ]
    return run_suite("triplets", frames)


def probe_image(path: str | os.PathLike) -> tuple[str, int | None, int | None]:
    """('ok', width, height) when the file exists and decodes fully; else a status saying why."""
    p = Path(path)
    if not p.is_file():
        return "missing", None, None
    try:
        with Image.open(p) as im:
            im.load()  # decodes every byte: a truncated file fails here, not at open
            return "ok", im.width, im.height
    except Exception as e:  # noqa: BLE001 - any decoder error means the file is unusable
        return f"undecodable: {type(e).__name__}: {e}", None, None


def probe_images(root: str | os.PathLike, paths: Sequence[str], workers: int = 4) -> pd.DataFrame:
    root = Path(root)
    with ThreadPoolExecutor(workers) as pool:
        probed = list(pool.map(lambda p: probe_image(root / p), paths, chunksize=256))
    return pd.DataFrame(probed, columns=["file_status", "width", "height"], dtype=object)


def validate_images(images: pd.DataFrame, root: str | os.PathLike | None = None, *,
                    side_bounds: tuple[int, int] = IMAGE_SIDE_BOUNDS) -> QualityReport:
    """Non-null ids and paths, ids unique within (split, category); with ``root``, every file
    present and decodable with both sides within ``side_bounds`` pixels."""
    import great_expectations as gx

    E = gx.expectations
    df = pd.DataFrame({
        "image_id": images["image_id"].astype(object),
        "path": images["path"].astype(object),
        "image_key": _key(images["split"], images["image_id"]) + ":" + images["category"].fillna("").astype(str),
    })
    checks = [
        (E.ExpectColumnValuesToNotBeNull(column="image_id"), "every image has an id"),
        (E.ExpectColumnValuesToNotBeNull(column="path"), "every image has a path"),
        (E.ExpectColumnValuesToBeUnique(column="image_key"), "image ids are unique within their split"),
    ]
    if root is not None:
        probed = probe_images(root, [str(p) for p in df["path"]])
        df = pd.concat([df, probed], axis=1)
        lo, hi = side_bounds
        checks += [
            (E.ExpectColumnValuesToBeInSet(column="file_status", value_set=["ok"]), "image files exist and decode"),
            (
                E.ExpectColumnValuesToBeBetween(column="width", min_value=lo, max_value=hi),
                f"image width in [{lo}, {hi}] px",
            ),
            (
                E.ExpectColumnValuesToBeBetween(column="height", min_value=lo, max_value=hi),
                f"image height in [{lo}, {hi}] px",
            ),
        ]
    df = nulls_as_none(df)
    return run_suite("images", [Frame("images", df, ["image_id"], checks)])
