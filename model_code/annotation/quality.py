"""The data-quality suite of chain-of-thought annotations (Great Expectations 1.x, on the suite runner
of :mod:`model_code.data.quality`): ``validate_annotations(annotations, triplets)`` returns a
:class:`~model_code.data.quality.QualityReport`."""

from __future__ import annotations

import re

import pandas as pd

from model_code.annotation.judge import DEFAULT_LENGTH_BOUNDS, LEAKAGE_PATTERNS, LengthBounds  # noqa: F401 - LengthBounds: part of this module's API
from model_code.chain import SECTIONS, word_count
from model_code.chain import normalised_text as norm
from model_code.data import nulls_as_none
from model_code.data.quality import Frame, QualityReport, run_suite

# great_expectations: imported where used (slow to import; the Dagster definitions load this module)


# modification texts that ask for no change (the conclusion may then repeat the caption)
NO_CHANGE = r"^\s*(same|no change|unchanged|identical|keep it)\W*$"


def validate_annotations(annotations: pd.DataFrame, triplets: pd.DataFrame | None = None, *,
                         min_acceptance: float = 0.95,
                         length_bounds: dict[str, LengthBounds] | None = None) -> QualityReport:
    """The gate on CoT annotations: acceptance rate at least ``min_acceptance``; known statuses;
    unique keys; a reason for every rejection; for accepted rows, non-empty sections, word-count
    percentiles within bounds, no phrase that leaks the target image, and a conclusion that differs
    from the caption whenever the modification asks for a change; every query known to ``triplets``."""
    import great_expectations as gx

    E = gx.expectations
    bounds = {**DEFAULT_LENGTH_BOUNDS, **(length_bounds or {})}
    a = nulls_as_none(annotations).reset_index(drop=True)
    rows = pd.DataFrame({
        "query_id": a["query_id"], "status": a["status"], "reject_reason": a["reject_reason"],
        "key": a["query_id"].astype(str) + "|" + a["teacher"].astype(str) + "|" + a["prompt_version"].astype(str),
        "accepted": (a["status"] == "ok").astype(int),
    })
    checks = [
        (E.ExpectColumnValuesToBeInSet(column="status", value_set=["ok", "rejected"]), "status is ok or rejected"),
        (E.ExpectColumnValuesToBeUnique(column="key"), "one row per (query, teacher, prompt version)"),
        (E.ExpectColumnMeanToBeBetween(column="accepted", min_value=min_acceptance, max_value=1.0),
         f"acceptance rate at least {min_acceptance:.0%}"),
    ]
    if triplets is not None:
        checks.append((E.ExpectColumnValuesToBeInSet(column="query_id", value_set=sorted(set(triplets["query_id"]))),
                       "every annotated query is in the triplets table"))
    frames = [Frame("annotations", rows, ["query_id"], checks)]

    rejected = rows[rows.status != "ok"].reset_index(drop=True)
    if len(rejected):
        frames.append(Frame("rejected", rejected, ["query_id"], [
            (E.ExpectColumnValuesToNotBeNull(column="reject_reason"), "every rejection records its reason")]))

    ok = a[a["status"] == "ok"].reset_index(drop=True)
    if len(ok):
        acc = pd.DataFrame({"query_id": ok["query_id"]})
        for s in SECTIONS:
            acc[s] = ok[s]
            acc[f"{s}_words"] = [word_count(str(t)) if t is not None else 0 for t in ok[s]]
        asks_change = pd.Series(True, index=ok.index)
        if triplets is not None:
            mods = dict(zip(triplets["query_id"], triplets["modification"]))
            asks_change = pd.Series([not re.match(NO_CHANGE, str(mods.get(q, "")), re.I) for q in ok["query_id"]])
        acc["conclusion_differs"] = [bool((not change) or norm(str(cap)) != norm(str(con)))
                                     for change, cap, con in zip(asks_change, ok["caption"], ok["conclusion"])]
        leak = [f"(?i){p}" for p in LEAKAGE_PATTERNS]
        acc_checks = []
        for s in SECTIONS:
            b = bounds[s]
            acc_checks += [
                (E.ExpectColumnValuesToNotBeNull(column=s), f"accepted {s}s are present"),
                (E.ExpectColumnValuesToMatchRegex(column=s, regex=r"\S"), f"accepted {s}s are not empty"),
                (E.ExpectColumnQuantileValuesToBeBetween(
                    column=f"{s}_words", quantile_ranges={"quantiles": [0.05, 0.95],
                                                          "value_ranges": [[b.p05_min, None], [None, b.p95_max]]}),
                 f"{s} length: 5th percentile >= {b.p05_min} words, 95th <= {b.p95_max}"),
                (E.ExpectColumnValuesToNotMatchRegexList(column=s, regex_list=leak),
                 f"{s} never mentions a target/second image"),
            ]
        acc_checks.append((E.ExpectColumnValuesToBeInSet(column="conclusion_differs", value_set=[True]),
                           "the conclusion differs from the caption when the text asks for a change"))
        frames.append(Frame("accepted", acc, ["query_id"], acc_checks))
    return run_suite("annotations", frames)
