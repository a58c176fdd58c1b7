"""feedback_triplets[d], its blocking check, and online_metrics[d]: what people answered in the page
becomes training data and an online figure (docs/feedback.md).

``feedback_triplets`` reads the dataset's feedback store (``<artifacts>/feedback/<d>/``, written by
the service), turns the answers into triplets with ``collect_triplets`` (the chosen image the target,
the shown-and-rejected ones hard negatives; de-duplicated; at most ``CIRCOT_FEEDBACK_CAP_PER_TOKEN``
per token; a leakage guard against every image outside the train split, by id and by content),
annotates them with the dataset's annotator through the annotation store ``cot_annotations`` uses,
and writes a version folder named by its content
(``<artifacts>/feedback_triplets/<d>/versions/<version>/``, model_code/feedback_tables.py). Nothing
accepted yet is an empty version. The blocking check ``feedback_suite`` verifies every id, text and
the leakage guard again. ``online_metrics`` reports per model version the share of answered queries
whose pick was at rank 1 and within the top 10 and the rate of "none of these", beside the model's
offline headline.
"""

import dataclasses
import os
import shutil
from collections import Counter
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.common import (
    FEEDBACK_CHECKS,
    TABLE_CHECKS,
    dataset_partitions,
    latest_record,
    png_markdown,
    publish_version,
    record_check,
)
from assets.cot_annotations import annotations_dir
from assets.resources import AnnotatorResource, ArtifactStore
from assets.triplets import triplets
from model_code.annotation.judge import judge_person
from model_code.annotation.quality import validate_annotations
from model_code.annotation.store import (
    ANNOTATION_COLUMNS,
    AnnotationStore,
    RunStats,
    annotate_missing,
    annotation_requests,
    read_annotations,
    write_annotations,
)
from model_code.common import content_hash
from model_code.data import DataError, read_tables
from model_code.data.tables import TablesRecord
from model_code.feedback import FeedbackStore, collect_triplets
from model_code.feedback import online_metrics as measure
from model_code.feedback_tables import (
    TRAIN_SPLIT,
    FeedbackRecord,
    leakage_guard,
    verify_feedback,
    write_feedback_tables,
)
from model_code.settings import PipelineSettings, load

PERSON_CHAINS = "person_chains.parquet"   # in a version: every chain a person wrote, judged (accepted or not)
REPORT_KEYS = ("events", "accepted", "none_of_these", "rejected_only", "leak", "duplicate", "over_cap", "unknown",
               "corrections", "person_chains")


def feedback_store(artifacts: ArtifactStore, dataset: str) -> FeedbackStore:
    """The dataset's feedback as the service wrote it (fetched first from an object-store root: its
    files never change once written, so only new ones are fetched)."""
    folder = artifacts.dir("feedback", dataset)
    artifacts.pull(folder, only_missing=True)
    return FeedbackStore(folder, dataset)


def _guard(context, artifacts: ArtifactStore, dataset: str, tables: TablesRecord | None = None):
    """(tables record, tables, leakage guard) of the newest triplets tables that passed their checks
    (or of ``tables``)."""
    if tables is None:
        tables = TablesRecord.from_dict(latest_record(context, triplets, dataset, passed=TABLE_CHECKS))
    bench = read_tables(tables.folder)
    cache = artifacts.path("feedback_triplets", dataset, "image_digests.json")
    return tables, bench, leakage_guard(bench.images, tables.root, cache)


def accepted_feedback(context, artifacts: ArtifactStore, dataset: str) -> tuple[list[dict], dict]:
    """The feedback triplets ``dataset`` would accept now and ``collect_triplets``' report (no
    annotation, nothing written but the hash cache): what ``feedback_sensor`` counts."""
    _, _, guard = _guard(context, artifacts, dataset)
    rows, _, report = collect_triplets(feedback_store(artifacts, dataset), **guard.collect_kwargs(),
                                       cap_per_token=load(PipelineSettings)[0].feedback_cap_per_token)
    return rows, report


class FeedbackConfig(dg.Config):
    cap_per_token: int | None = Field(default=None, ge=1, description="The most triplets per bearer token; default "
                                                                       "CIRCOT_FEEDBACK_CAP_PER_TOKEN.")
    chunk_size: int = Field(default=256, description="Annotations stored per write (the most a crash can lose).")


def _person_annotations(person: dict[str, dict]) -> pd.DataFrame:
    """The chains people wrote (a correction, then a pick), by triplet id, as annotations of source
    ``person``: each judged by the rules a teacher's chain meets; one that fails them is a recorded
    rejection with its reason, never trained on."""
    rows = [dataclasses.asdict(judge_person(q, chain)) for q, chain in sorted(person.items())]
    return pd.DataFrame(rows, columns=ANNOTATION_COLUMNS)


def _annotate(context, annotator: AnnotatorResource, artifacts: ArtifactStore, tables: TablesRecord, bench,
              feedback, staging: Path, chunk_size: int, person: dict[str, dict] | None = None):
    """The chains of the feedback triplets: a person's own where they corrected the chain before
    picking (``person``: triplet id -> chain) and it passed the rules, else through the dataset's
    annotation store (shared with cot_annotations: content already annotated is not asked again).
    (table, the people's chains judged (accepted and rejected), teacher, stats)."""
    judged = _person_annotations(person or {})
    people = judged[judged["status"] == "ok"]
    # a person's chain that failed the rules is kept (judged) and the teacher annotates the triplet as any
    asked = feedback.triplets[~feedback.triplets["query_id"].isin(set(people["query_id"]))]
    if asked.empty:
        return people.reset_index(drop=True), judged, None, RunStats()
    teacher = annotator.build(tables.dataset, tables.root)
    # the teacher sees the benchmark's train images and the new references copied into the version
    new = feedback.images.assign(path=[str(staging / p) for p in feedback.images["path"]])
    images = pd.concat([bench.images[bench.images["split"] == TRAIN_SPLIT], new], ignore_index=True)
    try:
        requests = annotation_requests(asked, images, tables.root)
    except FileNotFoundError as e:
        raise dg.Failure(description=f"annotation shows the teacher the images, and one is missing: {e.filename}") \
            from None
    store = AnnotationStore(annotations_dir(artifacts, tables.dataset) / "store")
    stats = annotate_missing(store, teacher, requests, chunk_size=chunk_size, progress=context.log.info)
    if stats.failed:
        raise dg.Failure(description=(
            f"{stats.failed} teacher requests failed after retries (first: {getattr(teacher, 'errors', ['?'])[0]}); "
            f"the {stats.annotated} annotations made were stored: materialise again to retry the rest."))
    taught = store.view(requests, teacher.name, teacher.prompt_version)
    return (pd.concat([taught, people], ignore_index=True) if len(people) else taught), judged, teacher, stats


def _examples(feedback, table, n: int = 5) -> str:
    chains = {row.query_id: row for row in table.itertuples()}
    blocks = []
    for t in feedback.triplets.head(n).itertuples():
        a = chains.get(t.query_id)
        chain = (f"- caption: {a.caption}\n- reasoning: {a.reasoning}\n- conclusion: {a.conclusion}" if a is not None
                 and a.status == "ok" else f"- no chain ({a.reject_reason if a is not None else 'not annotated'})")
        blocks.append(f"**{t.query_id}**: {t.reference_id} + *{t.modification}* -> {', '.join(t.target_ids)}; "
                      f"hard negatives: {', '.join(t.hard_negative_ids) or 'none'}\n\n{chain}")
    return "\n\n---\n\n".join(blocks) or "(no accepted feedback yet)"


@dg.asset(partitions_def=dataset_partitions, group_name="feedback", deps=[triplets], kinds={"parquet"},
          description="People's answers in the page as training triplets (leakage-guarded, capped per token, "
                      "annotated), versioned by content")
def feedback_triplets(context: dg.AssetExecutionContext, config: FeedbackConfig, annotator: AnnotatorResource,
                      artifacts: ArtifactStore) -> dg.MaterializeResult:
    name = context.partition_key
    cap = config.cap_per_token or load(PipelineSettings)[0].feedback_cap_per_token
    try:
        tables, bench, guard = _guard(context, artifacts, name)
    except DataError as e:
        raise dg.Failure(description=str(e)) from None
    rows, images, report = collect_triplets(feedback_store(artifacts, name), **guard.collect_kwargs(),
                                            cap_per_token=cap)
    # written beside the published versions, then moved to a folder of its own version: a set that
    # fails its check never replaces the one that passed
    staging = artifacts.dir("feedback_triplets", name, f".staging-{os.getpid()}")
    shutil.rmtree(staging)   # what an interrupted run with this process id left
    staging.mkdir()
    try:
        feedback = write_feedback_tables(staging, rows, images)
        person = {r["query_id"]: r["person_chain"] for r in rows if r.get("person_chain")}
        table, judged, teacher, stats = _annotate(context, annotator, artifacts, tables, bench, feedback, staging,
                                                  config.chunk_size, person)
        write_annotations(table, staging / "annotations.parquet")
        if len(judged):   # every chain a person wrote, accepted or rejected with its reason
            write_annotations(judged, staging / PERSON_CHAINS)
        version = content_hash([p for p in staging.rglob("*") if p.is_file()], staging)
        out = publish_version(staging, artifacts.dir("feedback_triplets", name, "versions") / version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    ok = int((table["status"] == "ok").sum())
    person_ok = int((judged["status"] == "ok").sum())
    record = FeedbackRecord(
        dataset=name, folder=str(out), version=version, tables_folder=tables.folder, tables_version=tables.version,
        root=tables.root, raw_version=tables.raw_version, teacher=teacher.name if teacher else "",
        prompt_version=teacher.prompt_version if teacher else "", cap_per_token=cap, report=report,
        triplets=len(feedback.triplets), new_images=len(feedback.images), annotated_ok=ok,
        annotated_rejected=len(table) - ok, person_chains=person_ok, person_rejected=len(judged) - person_ok)
    record.write(out / FeedbackRecord.META)
    per_token = Counter(r["token"] for r in rows)
    context.log.info(f"feedback_triplets[{name}]: {report['accepted']} accepted of {report['events']} answers "
                     f"({report['leak']} held out, {report['duplicate']} duplicates, {report['over_cap']} over the "
                     f"cap of {cap} per token); {ok} with a chain -> {out}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "record": dg.MetadataValue.json(record.to_dict()),
            "path": dg.MetadataValue.path(str(out)), "version": version,
            "dagster/row_count": len(feedback.triplets),
            **{k: int(report[k]) for k in REPORT_KEYS},
            "new_reference_images": len(feedback.images), "tokens": len(per_token),
            "most_from_one_token": max(per_token.values(), default=0), "cap_per_token": cap,
            "teacher": record.teacher or "none", "annotated_ok": ok, "annotation_rejected": len(table) - ok,
            "person_chains": person_ok, "person_chains_rejected": record.person_rejected,
            "person_reject_reasons": dg.MetadataValue.json(
                judged[judged["status"] != "ok"]["reject_reason"].value_counts().to_dict()),
            "without_chain": len(feedback.triplets) - len(table),
            "annotated_this_run": stats.annotated, "already_stored": stats.already_done,
            "unknown_to_annotator": stats.unknown,
            "examples": dg.MetadataValue.md(_examples(feedback, table)),
            "tables_version": tables.version, "raw_data_version": tables.raw_version,
        })


def _person_chain_problems(record: FeedbackRecord) -> list[tuple[str, str]]:
    """The chains people wrote, through the annotation suite a teacher's chains pass (Great
    Expectations: sections, lengths, leakage, a conclusion that differs from the caption, a reason for
    every rejection); any rejection rate (a rejected chain is kept, not trained on)."""
    path = Path(record.folder) / PERSON_CHAINS
    if not path.is_file():
        return []
    people = read_annotations(path)
    report = validate_annotations(people, read_tables(record.folder).triplets, min_acceptance=0.0)
    return [("chain", o.line()) for o in report.failed]


@dg.asset_check(asset=feedback_triplets, blocking=True, partitions_def=dataset_partitions,
                description="Every id in the gallery (or a new reference whose file holds its bytes), texts within "
                            "limits, and no held-out image (by id or content) in any row")
def feedback_suite(context: dg.AssetCheckExecutionContext, artifacts: ArtifactStore) -> dg.AssetCheckResult:
    name = context.partition_key
    record = FeedbackRecord.from_dict(latest_record(context, feedback_triplets, name))
    try:
        # the tables the version was built against, not whichever came later
        _, _, guard = _guard(context, artifacts, name, TablesRecord.load(record.tables_folder))
        problems = verify_feedback(record.folder, name, guard)
        problems += _person_chain_problems(record)
    except (DataError, OSError) as e:
        problems = [("unreadable", str(e))]
    counts = Counter(kind for kind, _ in problems)
    record_check(context, record.folder, FEEDBACK_CHECKS[0], not problems,
                 problems=[f"{kind}: {message}" for kind, message in problems[:200]])
    rows = len(read_tables(record.folder).triplets) if Path(record.folder, "triplets.parquet").is_file() else 0
    shown = "\n".join(f"- {kind}: {message}" for kind, message in problems[:50])
    if problems:
        context.log.error(f"feedback_suite {name}: {len(problems)} problems\n{shown}")
    return dg.AssetCheckResult(
        passed=not problems, severity=dg.AssetCheckSeverity.ERROR,
        description=(f"{rows} feedback triplets: all ids known, texts within limits, nothing held out" if not problems
                     else f"{len(problems)} problems: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))),
        metadata={"rows": rows, "problems": dg.MetadataValue.md(shown or "none"),
                  **{f"{k}_problems": counts.get(k, 0) for k in ("id", "text", "leak", "table", "chain")},
                  "version": record.version})


# ---------------------------------------------------------------------------------------------
# the online figure


def offline_headlines(instance: dg.DagsterInstance, dataset: str, history: int = 200) -> dict[str, dict]:
    """{model version: {split, headline, value}} of the newest evaluation of each model version on
    ``dataset`` (the offline benchmark's figure, from the evaluation records)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("evaluation"), asset_partitions=[dataset]), limit=history).records
    out: dict[str, dict] = {}
    for entry in records:
        meta = entry.asset_materialization.metadata
        record = meta["record"].value if "record" in meta else None
        if not record or record.get("model_version") in out:
            continue
        value = record.get("metrics", {}).get("cot", {}).get(record.get("headline"))
        if value is not None:
            out[record["model_version"]] = {"split": record.get("split"), "headline": record["headline"],
                                            "value": float(value)}
    return out


def _plot(online: dict, offline: dict, order: list[str], path: Path) -> Path | None:
    if not order:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = (("pick_at_1", "pick at rank 1"), ("pick_in_10", "pick in the top 10"),
              ("none_of_these", "none of these"))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 + 1.4 * len(order)), 4.2))
    width = 0.8 / len(series)
    for s, (key, label) in enumerate(series):
        ax.bar([i + (s - 1) * width for i in range(len(order))], [online[v][key] for v in order], width, label=label)
    known = [(i, offline[v]) for i, v in enumerate(order) if v in offline]
    if known:
        ax.scatter([i for i, _ in known], [o["value"] for _, o in known], marker="D", color="black", zorder=3,
                   label=f"offline {known[0][1]['headline']} ({known[0][1]['split']})")
    ax.set_xticks(range(len(order)), [f"{v[:10]}\n{online[v]['answered']} answers" for v in order], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of answered queries")
    ax.set_title("online, per model version (the offline headline beside the top-10 bar)", fontsize=8)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


@dg.asset(partitions_def=dataset_partitions, group_name="feedback", deps=[dg.AssetKey("evaluation")],
          kinds={"matplotlib"},
          description="Per model version, online: share of answered queries picked at rank 1 and in the top 10, "
                      "rate of 'none of these', beside the offline headline")
def online_metrics(context: dg.AssetExecutionContext, artifacts: ArtifactStore) -> dg.MaterializeResult:

    name = context.partition_key
    store = feedback_store(artifacts, name)
    online = measure(store)
    first_seen: dict[str, float] = {}
    for q in store.queries().values():
        first_seen[q.model_version] = min(q.time, first_seen.get(q.model_version, q.time))
    order = sorted(online, key=lambda v: first_seen.get(v, 0.0))
    offline = offline_headlines(context.instance, name)
    table = ("| model version | answered | pick at 1 | pick in top 10 | none of these | offline |\n"
             "|---|---|---|---|---|---|")
    for v in order:
        m, o = online[v], offline.get(v)
        shown = f"{o['headline']} {o['value']:.3f} ({o['split']})" if o else "not evaluated"
        table += (f"\n| {v} | {m['answered']} | {m['pick_at_1']:.3f} | {m['pick_in_10']:.3f} | "
                  f"{m['none_of_these']:.3f} | {shown} |")
    plot = _plot(online, offline, order, artifacts.path("online_metrics", name, "online.png"))
    latest = order[-1] if order else None
    context.log.info(f"online_metrics[{name}]: {len(order)} model versions\n{table}")
    metadata = {"table": dg.MetadataValue.md(table if order else "(no answered query yet)"),
                "online": dg.MetadataValue.json({v: {**online[v], "offline": offline.get(v)} for v in order}),
                "plot": png_markdown(plot, "online and offline figures per model version"),
                "model_versions": len(order), "answered": sum(m["answered"] for m in online.values()),
                "latest_model_version": latest or "none"}
    if latest:   # the newest model's figures as numbers: the Dagster UI plots them across materialisations
        metadata.update({k: float(online[latest][k]) for k in ("pick_at_1", "pick_in_10", "none_of_these")})
    return dg.MaterializeResult(metadata=metadata)
