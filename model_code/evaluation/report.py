"""What an evaluation writes: metrics.json, a markdown table, plots, per-query reasoning, and the
files the benchmarks' evaluation servers take (CIRR test1, CIRCO test).
"""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from pathlib import Path

from PIL import Image

from model_code.benchmarks import zero_shot_note
from model_code.common import atomic_write_json
from model_code.evaluation.evaluate import MODEL_METHODS, Evaluation

# matplotlib: imported where used (slow to import, ~0.3 s; only the plots need it, on the Agg backend chosen
# before pyplot is imported)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown_table(ev: Evaluation) -> str:
    """The methods side by side: the benchmark's metrics, then (synthetic) the breakdowns and
    reasoning correctness, then speed."""
    if ev.hidden:
        n = len(next(iter(ev.rankings.values()), {}))
        return (f"{ev.dataset}/{ev.split}: targets are hidden; {n} queries ranked"
                f"{zero_shot_note(ev.dataset, ev.trained_on)}, submission files written for the evaluation server.\n")
    methods = list(ev.metrics)
    shared = [k for k in ev.metrics[methods[0]] if all(k in ev.metrics[m] for m in methods)]
    main = [k for k in shared if "[" not in k and "/" not in k]
    lines = [f"### {ev.dataset} / {ev.split} — model {ev.model_version}{zero_shot_note(ev.dataset, ev.trained_on)} "
             f"({len(ev.queries)} queries)", "",
             "| method | " + " | ".join(main) + " | queries/s |", "|---" * (len(main) + 2) + "|"]
    for m in methods:
        speed = ev.timings.get(m, {}).get("per_s", "cached")
        lines.append(f"| {m} | " + " | ".join(_fmt(ev.metrics[m][k]) for k in main) + f" | {_fmt(speed)} |")
    extra = [k for k in shared if "[" in k or "/" in k]
    if extra:
        lines += ["", "| method | " + " | ".join(extra) + " |", "|---" * (len(extra) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(_fmt(ev.metrics[m].get(k, "")) for k in extra) + " |" for m in methods]
    cot_only = [k for k in ev.metrics.get("cot", {}) if k.startswith(("cot_", "conclusion_"))]
    if cot_only:
        lines += ["", "Reasoning (cot): " + ", ".join(f"{k} {ev.metrics['cot'][k]:.3f}" for k in cot_only)]
    gallery = ev.timings.get("gallery")
    if gallery:
        lines += ["", f"Gallery: {gallery['n']} images embedded at {gallery['per_s']:.1f}/s."]
    return "\n".join(lines) + "\n"


def plot_recall(ev: Evaluation, path: str | os.PathLike) -> Path:
    """Recall@K (or mAP@K) per method, one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix, ks = ev.spec.metric_prefix, ev.spec.ks
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, m in ev.metrics.items():
        ax.plot(ks, [m[f"{prefix}@{k}"] for k in ks], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K")
    ax.set_ylabel(f"{prefix}@K")
    ax.set_ylim(0, 1)
    ax.set_title(f"{ev.dataset} / {ev.split}{zero_shot_note(ev.dataset, ev.trained_on)}")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_qualitative(ev: Evaluation, image_paths: dict[str, Path], path: str | os.PathLike, n: int = 4,
                     method: str = "cot") -> Path:
    """A grid: per query, the reference, the modification and generated reasoning, and the top-5
    results with the target framed in green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    method = method if method in ev.rankings else next(iter(ev.rankings))
    rows = ev.queries.iloc[:n]
    fig, axes = plt.subplots(len(rows), 7, figsize=(16, 2.6 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.6, 1, 1, 1, 1, 1]})
    for ax_row, (_, q) in zip(axes, rows.iterrows()):
        for ax in ax_row:
            ax.axis("off")
        with Image.open(image_paths[q["reference_id"]]) as im:
            ax_row[0].imshow(im.convert("RGB"))
        ax_row[0].set_title("reference", fontsize=8)
        r = ev.reasoning.get(q["query_id"], {})
        text = f"Modification: {q['modification']}\n\n" + (r.get("text") or "(no reasoning: " + method + ")")
        ax_row[1].text(0, 1, "\n".join(textwrap.wrap(text, 70, replace_whitespace=False)[:14]), fontsize=6.5,
                       va="top", family="monospace", transform=ax_row[1].transAxes)
        targets = set(q["target_ids"])
        for j, image_id in enumerate(ev.rankings[method].get(q["query_id"], [])[:5]):
            ax = ax_row[2 + j]
            with Image.open(image_paths[image_id]) as im:
                ax.imshow(im.convert("RGB"))
            hit = image_id in targets
            ax.set_title(f"#{j + 1}{' target' if hit else ''}", fontsize=8, color="green" if hit else "black")
            if hit:
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_edgecolor("green")
                    spine.set_linewidth(4)
    fig.suptitle(f"{ev.dataset} / {ev.split}: {method} (model {ev.model_version}"
                 f"{zero_shot_note(ev.dataset, ev.trained_on)})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def submissions(ev: Evaluation, method: str) -> dict[str, dict]:
    """The evaluation server's files for ``method`` (``{file name: content}``), in the benchmark's
    own format (``BenchmarkSpec.submissions``: CIRR's rc2 recall and subset files, CIRCO's top 50);
    none for a benchmark without a server."""
    return ev.spec.submissions(ev.split, method, ev.rankings[method], ev.subset_rankings.get(method, {}),
                               ev.queries["query_id"])


def _jsonable(r: dict) -> dict:
    cot = r.get("cot")
    return {"text": r.get("text"), "cot": dataclasses.asdict(cot) if cot is not None else None, "error": r.get("error")}


def write_report(
    ev: Evaluation, out_dir: str | os.PathLike, image_paths: dict[str, Path] | None = None
) -> dict[str, Path]:
    """Write metrics.json, table.md, evaluation.json (timings, versions), queries.jsonl (per query:
    reasoning and top-10 per method), the plots, and the submission files of a hidden split.
    Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}

    def dump(name: str, obj) -> Path:
        p = written[name] = atomic_write_json(out / name, obj)
        return p

    if not ev.hidden:
        dump("metrics.json", ev.metrics)
        dump("per_query.json", {"headline": ev.headline, "scores": ev.per_query, "strata": ev.strata})
        written["recall.png"] = plot_recall(ev, out / "recall.png")
    else:
        for method in [m for m in MODEL_METHODS if m in ev.rankings]:
            for name, content in submissions(ev, method).items():
                dump(name, content)
    dump("evaluation.json", {"dataset": ev.dataset, "split": ev.split, "model_version": ev.model_version,
                             "trained_on": ev.trained_on, "zero_shot_from": ev.zero_shot_from, "hidden": ev.hidden,
                             "headline": ev.headline, "queries": len(ev.queries),
                             "timings": ev.timings})
    (out / "table.md").write_text(markdown_table(ev))
    written["table.md"] = out / "table.md"
    with open(out / "queries.jsonl", "w") as f:
        for q in ev.queries.itertuples():
            row = {
                "query_id": q.query_id,
                "reference_id": q.reference_id,
                "modification": q.modification,
                "target_ids": list(q.target_ids),
                "top10": {m: ev.rankings[m].get(q.query_id, [])[:10] for m in ev.rankings},
            }
            if q.query_id in ev.reasoning:
                row["reasoning"] = _jsonable(ev.reasoning[q.query_id])
            f.write(json.dumps(row) + "\n")
    written["queries.jsonl"] = out / "queries.jsonl"
    if image_paths is not None and not ev.hidden:
        written["qualitative.png"] = plot_qualitative(ev, image_paths, out / "qualitative.png")
    return written
