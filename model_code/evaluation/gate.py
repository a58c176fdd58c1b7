"""The promotion gate: does an evaluated model earn promotion?

Three rules, each reported with its numbers so the verdict explains itself:

1. floors      every configured metric of the gated method (``cot``) at or above its floor;
2. reasoning   CoT not worse than the ``no_cot`` ablation on the headline metric: with the
               per-query scores, a paired bootstrap over the queries fails the model only when CoT
               is worse with the configured confidence (a 500-query benchmark cannot tell a point
               or two apart); without them, the means within a tolerance. Can be switched off;
3. regression  the headline metric not below the production model's on the same dataset and
               split by more than a tolerance (passes when there is no production model yet, or
               when the production model is this very model).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from model_code.benchmarks import benchmark
from model_code.settings import parse_floors


def gate_floors(dataset: str, text: str | None) -> dict[str, float]:
    """The floors of ``dataset``: the built-in ones, then the configured floors for every dataset,
    then those for ``dataset``, each over the one before (merged, never replacing the whole set)."""
    given = parse_floors(text) if text else {"": {}}
    return {**benchmark(dataset).gate_floors, **given[""], **given.get(dataset, {})}


@dataclasses.dataclass
class GateConfig:
    floors: dict[str, float] = dataclasses.field(default_factory=dict)  # metric -> minimum
    method: str = "cot"                  # the method whose metrics the floors and regression check read
    cot_not_worse: bool = True
    cot_tolerance: float = 0.0           # cot may trail no_cot by this much (absolute) on the headline
    cot_confidence: float | None = 0.95  # with per-query scores: fail only when cot is worse at this confidence
    max_regression: float = 0.01         # the headline may fall this much (absolute) below production


@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclasses.dataclass
class Verdict:
    passed: bool
    checks: list[Check]
    headline: str
    value: float
    note: str = ""      # what the reader must know first (e.g. "evaluated zero-shot from cirr")

    def explain(self) -> str:
        head = [f"- {self.note}"] if self.note else []
        return "\n".join(head + [f"- {'PASS' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in self.checks])

    def to_dict(self) -> dict:
        return {"passed": self.passed, "headline": self.headline, "value": self.value, "note": self.note,
                "checks": [dataclasses.asdict(c) for c in self.checks]}


def paired_bootstrap(a: list[float], b: list[float], confidence: float = 0.95, resamples: int = 2000,
                     seed: int = 0, strata: list[str] | None = None) -> tuple[float, float, float]:
    """Mean of a - b over paired items and its two-sided bootstrap confidence interval
    (deterministic under ``seed``). With ``strata`` (a group per item) the statistic is the mean over
    the groups of each group's mean difference, and items are resampled within their group: the
    same statistic as a headline that averages per group (FashionIQ's categories)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size == 0:
        raise ValueError("no paired scores")
    rng = np.random.default_rng(seed)
    labels = np.asarray(strata if strata is not None else [""] * d.size)
    names = sorted(set(labels.tolist()))
    parts = [d[labels == name] for name in names]
    means = np.mean([p[rng.integers(0, p.size, size=(resamples, p.size))].mean(axis=1) for p in parts], axis=0)
    tail = (1 - confidence) / 2
    return (float(np.mean([p.mean() for p in parts])), float(np.quantile(means, tail)),
            float(np.quantile(means, 1 - tail)))


def gate(metrics: dict[str, dict[str, float]], headline: str, config: GateConfig,
         production: dict | None = None, per_query: dict[str, dict[str, float]] | None = None,
         strata: dict[str, str] | None = None, note: str = "") -> Verdict:
    """``metrics`` as :func:`model_code.evaluation.evaluate.score` returns them; ``production``:
    ``{"version", "metrics": {metric: value}}`` of the dataset's production model on the same split
    (its gated method), or None; ``per_query``: ``{method: {query_id: headline score}}``;
    ``strata``: ``{query_id: group}`` where the headline is a mean over groups; ``note``: said first
    in the verdict (a zero-shot evaluation says so)."""
    if config.method not in metrics:
        raise ValueError(f"the gate reads method {config.method!r}, which was not evaluated ({', '.join(metrics)})")
    ours = metrics[config.method]
    checks = []
    for metric, floor in sorted(config.floors.items()):
        if metric not in ours:
            checks.append(Check(f"floor {metric}", False, f"{metric} was not measured (known: {', '.join(ours)})"))
            continue
        checks.append(Check(f"floor {metric}", ours[metric] >= floor, f"{ours[metric]:.4f} vs floor {floor:.4f}"))
    if config.cot_not_worse and config.method == "cot" and "no_cot" in metrics:
        cot, no = ours[headline], metrics["no_cot"][headline]
        paired = per_query and "cot" in per_query and "no_cot" in per_query and config.cot_confidence
        if paired:
            ids = sorted(per_query["cot"])
            groups = [strata.get(i, "") for i in ids] if strata else None
            diff, low, high = paired_bootstrap(
                [per_query["cot"][i] for i in ids],
                [per_query["no_cot"][i] for i in ids],
                config.cot_confidence,
                strata=groups,
            )
            ok = high >= -config.cot_tolerance
            checks.append(
                Check(
                    "cot not worse than no_cot",
                    ok,
                    f"{headline} cot {cot:.4f} vs no_cot {no:.4f}: difference {diff:+.4f}, "
                    f"{config.cot_confidence:.0%} interval [{low:+.4f}, {high:+.4f}] over {len(ids)} queries "
                    f"({'not significantly worse' if ok else 'significantly worse'}"
                    f"{', and better' if low > 0 else ''}; tolerance {config.cot_tolerance:.4f})",
                )
            )
        else:
            checks.append(Check("cot not worse than no_cot", cot >= no - config.cot_tolerance,
                                f"{headline} cot {cot:.4f} vs no_cot {no:.4f} (tolerance {config.cot_tolerance:.4f})"))
    if production is None:
        checks.append(Check("no regression", True, "no production model yet"))
    elif headline not in production.get("metrics", {}):
        checks.append(Check("no regression", True,
                            f"production model {production.get('version')} has no {headline} on this dataset"))
    else:
        prev = production["metrics"][headline]
        checks.append(Check("no regression", ours[headline] >= prev - config.max_regression,
                            f"{headline} {ours[headline]:.4f} vs production {production.get('version')} {prev:.4f} "
                            f"(tolerance {config.max_regression:.4f})"))
    return Verdict(all(c.passed for c in checks), checks, headline, ours[headline], note)
