"""cot_annotations[d]: a three-part chain of thought for each query, by the oracle or a teacher MLLM.

Rows are stored incrementally under ``<artifacts>/cot_annotations/<d>/store`` (an interrupted
materialisation resumes where it stopped); the current view for this teacher and prompt version is
``<artifacts>/cot_annotations/<d>/annotations.parquet`` with its ``AnnotationsRecord`` (``meta.json``,
and the asset's ``record`` metadata). A blocking check runs the annotation gate.
"""


from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.common import TABLE_CHECKS, check_result, dataset_partitions, latest_record, record_check
from assets.resources import AnnotatorResource, ArtifactStore
from assets.triplets import triplets
from model_code.annotation.quality import validate_annotations
from model_code.annotation.store import (
    AnnotationsRecord,
    AnnotationStore,
    annotate_missing,
    annotation_requests,
    annotation_version,
    read_annotations,
    write_annotations,
)
from model_code.data import HIDDEN_SPLITS, read_tables
from model_code.data.tables import TablesRecord


class AnnotationConfig(dg.Config):
    splits: list[str] | None = Field(
        default=None, description="Splits to annotate; default every split with known targets."
    )
    limit: int | None = Field(default=None, description="Annotate at most this many queries (a trial run).")
    min_acceptance: float | None = Field(
        default=None,
        description="Gate: least share of accepted annotations; default 1.0 for the oracle, 0.95 for a teacher.",
    )
    chunk_size: int = Field(default=256, description="Annotations stored per write (the most a crash can lose).")


def annotations_dir(artifacts: ArtifactStore, dataset: str):
    return artifacts.dir("cot_annotations", dataset)


def _examples_markdown(table, modifications, n: int = 5) -> str:
    blocks = []
    for row in table[table.status == "ok"].head(n).itertuples():
        blocks.append(f"**{row.query_id}** — *{modifications.get(row.query_id, '')}*\n\n"
                      f"- caption: {row.caption}\n- reasoning: {row.reasoning}\n- conclusion: {row.conclusion}")
    return "\n\n---\n\n".join(blocks) or "(no accepted annotation)"


@dg.asset(partitions_def=dataset_partitions, group_name="annotation", deps=[triplets], kinds={"parquet"},
          description=__doc__.split("\n\n")[0])
def cot_annotations(context: dg.AssetExecutionContext, config: AnnotationConfig, annotator: AnnotatorResource,
                    artifacts: ArtifactStore) -> dg.MaterializeResult:
    name = context.partition_key
    tables = TablesRecord.from_dict(latest_record(context, triplets, name, passed=TABLE_CHECKS))
    bench = read_tables(tables.folder)
    splits = config.splits or sorted({s for s in bench.triplets.split.unique() if (name, s) not in HIDDEN_SPLITS})
    teacher = annotator.build(name, tables.root)
    try:
        requests = annotation_requests(bench.triplets, bench.images, tables.root, splits, config.limit)
    except FileNotFoundError as e:
        raise dg.Failure(
            description=f"annotation shows the teacher the images, and one is missing: {e.filename}"
        ) from None
    out = annotations_dir(artifacts, name)
    store = AnnotationStore(out / "store")
    stats = annotate_missing(store, teacher, requests, chunk_size=config.chunk_size, progress=context.log.info)
    table = store.view(requests, teacher.name, teacher.prompt_version)
    if stats.failed:
        raise dg.Failure(description=(
            f"{stats.failed} teacher requests failed after retries (first: {getattr(teacher, 'errors', ['?'])[0]}); "
            f"the {stats.annotated} annotations made were stored: materialise again to retry the rest."))
    min_acceptance = config.min_acceptance if config.min_acceptance is not None else teacher.default_min_acceptance
    version = annotation_version(table)
    # each version in a folder of its own: a set that fails its check never replaces the one that passed
    folder = out / "versions" / version
    folder.mkdir(parents=True, exist_ok=True)
    write_annotations(table, folder / "annotations.parquet")
    ok = int((table.status == "ok").sum())
    record = AnnotationsRecord(dataset=name, path=str(folder / "annotations.parquet"), teacher=teacher.name,
                               prompt_version=teacher.prompt_version, version=version, raw_version=tables.raw_version,
                               min_acceptance=min_acceptance, splits=splits, ok=ok, rejected=len(table) - ok)
    record.write(folder / "meta.json")
    reasons = table[table.status != "ok"].reject_reason.value_counts()
    histogram = "| reject reason | count |\n|---|---|\n" + "\n".join(f"| {r} | {c} |" for r, c in reasons.items()) \
        if len(reasons) else "no rejections"
    modifications = dict(zip(bench.triplets.query_id, bench.triplets.modification))
    context.log.info(f"cot_annotations[{name}]: {ok} ok, {len(table) - ok} rejected ({teacher.name}, "
                     f"{teacher.prompt_version}) -> {out}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "record": dg.MetadataValue.json(record.to_dict()),
            "path": dg.MetadataValue.path(record.path),
            "teacher": teacher.name, "prompt_version": teacher.prompt_version,
            "dagster/row_count": len(table), "ok": ok, "rejected": len(table) - ok,
            "acceptance_rate": ok / len(table) if len(table) else 0.0,
            "reject_reasons": dg.MetadataValue.md(histogram),
            "examples": dg.MetadataValue.md(_examples_markdown(table, modifications)),
            "annotated_this_run": stats.annotated,
            "already_stored": stats.already_done,
            "quarantined_parts": dg.MetadataValue.json([str(q) for q in store.quarantined]),
            "annotations_per_s": round(stats.per_second, 1),
            "annotation_version": version, "raw_data_version": tables.raw_version,
        })


@dg.asset_check(
    asset=cot_annotations,
    blocking=True,
    partitions_def=dataset_partitions,
    description="Annotation gate (Great Expectations): acceptance rate, sections, lengths, leakage, "
    "caption vs conclusion",
)
def annotations_suite(context: dg.AssetCheckExecutionContext, artifacts: ArtifactStore) -> dg.AssetCheckResult:
    name = context.partition_key
    record = AnnotationsRecord.from_dict(latest_record(context, cot_annotations, name))
    table = read_annotations(record.path)
    tables = TablesRecord.from_dict(latest_record(context, triplets, name, passed=TABLE_CHECKS))
    bench = read_tables(tables.folder)
    report = validate_annotations(table, bench.triplets, min_acceptance=record.min_acceptance)
    record_check(context, Path(record.path).parent, "annotations_suite", report.success)
    if not report.success:
        context.log.error(report.to_text())
    return check_result(report, min_acceptance=record.min_acceptance)
