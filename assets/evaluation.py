"""evaluation[d], its promotion gate, and promoted_model[d] (docs/architecture.md §3, §6, §7).

``evaluation`` embeds the gallery and the queries of the dataset's scored split with the CIR-CoT
model trained for it, the newest ``cir_cot_model[t]`` materialisation (Dagster's lineage): ``t`` is the
dataset itself, or for a benchmark without a train split (CIRCO) the configured source
(``CIRCOT_ZERO_SHOT_SOURCE``, default cirr), which the report, the model card and the gate's verdict
name ("zero-shot from cirr"). It reports CIR-CoT, the
no-CoT ablation and the image-only / text-only baselines side by side
(``<artifacts>/evaluation/<d>/<split>/``: metrics.json, table.md, plots, per-query reasoning, and
``record.json``, the ``EvaluationRecord`` also carried as metadata); for a split with hidden
targets it writes the evaluation servers' files. The blocking ``promotion_gate`` check compares
the metrics with the configured floors, CoT with no-CoT, and the dataset's production model; only
when it passes does ``promoted_model`` save the evaluated model into the BentoML model store as
``cir-cot``, production for that dataset (model_code/registry.py).
"""

import json
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.common import (
    TABLE_CHECKS,
    dataset_partitions,
    latest_record,
    model_source_mapping,
    png_markdown,
    write_model_card,
)
from assets.resources import ArtifactStore, GateResource
from assets.training import cir_cot_model
from assets.triplets import triplets
from model_code import registry
from model_code.benchmarks import benchmark, zero_shot_note
from model_code.common import atomic_write_json
from model_code.data import read_tables
from model_code.data.tables import TablesRecord, image_paths
from model_code.evaluation.gate import gate as run_gate


class EvaluationConfig(dg.Config):
    methods: list[str] = Field(default=["cot", "no_cot", "image_only", "text_only"],
                               description="Methods side by side: cot, no_cot, image_only, text_only.")
    split: str | None = Field(
        default=None, description="Split to score; default the benchmark's (synthetic: test, else val)."
    )
    submissions: bool = Field(
        default=True,
        description="Also rank the split with hidden targets (CIRR test1, CIRCO test) "
        "and write the evaluation servers' files.",
    )
    limit: int | None = Field(
        default=None, description="Evaluate only the first queries of each gallery (a trial run)."
    )
    batch_size: int = Field(default=64, description="Queries / images per forward pass.")
    max_new_tokens: int = Field(default=256, description="Longest generated chain of thought (cot).")
    device: str | None = Field(default=None, description="cuda / cpu; default cuda when present.")
    dtype: str = Field(default="auto", description="auto: bfloat16 on a GPU, float32 on the CPU.")


def evaluation_dir(artifacts: ArtifactStore, dataset: str, split: str):
    return artifacts.dir("evaluation", dataset, split)


@dg.asset(partitions_def=dataset_partitions, group_name="evaluation", deps=[triplets], kinds={"pytorch"},
          ins={"cir_cot_model": dg.AssetIn(partition_mapping=model_source_mapping(), dagster_type=dg.Nothing)},
          description="Benchmark-exact metrics of CIR-CoT, the no-CoT ablation and two baselines; submission files")
def evaluation(
    context: dg.AssetExecutionContext, config: EvaluationConfig, artifacts: ArtifactStore
) -> dg.MaterializeResult:
    from model_code.evaluation.evaluate import EvaluationRecord, evaluate
    from model_code.evaluation.report import write_report
    from model_code.model.cir_cot import CirCoTModel
    from model_code.model.recipes import TrainedModel

    spec = benchmark(context.partition_key)
    source = context.asset_partition_key_for_input("cir_cot_model")   # spec itself, or the zero-shot source
    try:
        trained = TrainedModel.from_dict(latest_record(context, cir_cot_model, source))
    except dg.Failure as e:
        if source == spec.name:
            raise
        raise dg.Failure(description=f"{e.description} ({spec.title} has no train split: it is evaluated zero-shot "
                                     f"with the model trained on {source}, CIRCOT_ZERO_SHOT_SOURCE; run "
                                     f"`make run DATASET={source}` first)") from None
    tables = TablesRecord.from_dict(latest_record(context, triplets, spec.name, passed=TABLE_CHECKS))
    bench = read_tables(tables.folder)
    root = tables.root
    model = CirCoTModel.load(trained.path, dtype=config.dtype, device=config.device)
    split = config.split or spec.scored_split
    if split in spec.hidden_splits:
        raise dg.Failure(
            description=f"{spec.name}/{split} hides its targets: nothing to score (choose a split with targets)"
        )
    context.log.info(f"evaluation[{spec.name}]: model {trained.version}, trained on {source}"
                     f"{zero_shot_note(spec.name, source)}")
    cache = artifacts.dir("evaluation", spec.name, "cache")
    kwargs = {"methods": config.methods, "batch_size": config.batch_size, "max_new_tokens": config.max_new_tokens,
              "cache_dir": cache, "limit": config.limit, "say": context.log.info, "trained_on": source}
    paths = {i: p for (_, i), p in image_paths(bench.images, root).items()}
    ev = evaluate(model, bench, root, spec, split, **kwargs)
    out = evaluation_dir(artifacts, spec.name, split)
    written = write_report(ev, out, paths)
    submission_files = []
    hidden_split = spec.submission_split
    if config.submissions and hidden_split and hidden_split in set(bench.triplets["split"]):
        hidden = evaluate(model, bench, root, spec, hidden_split, **{**kwargs, "methods": [
            m for m in config.methods if m in ("cot", "no_cot")]})
        submission_files = [
            str(p)
            for n, p in write_report(hidden, evaluation_dir(artifacts, spec.name, hidden_split)).items()
            if n.startswith(spec.name)
        ]
    record = EvaluationRecord(dataset=spec.name, split=split, folder=str(out), model_version=trained.version,
                              model=trained.to_dict(), metrics=ev.metrics, headline=ev.headline, timings=ev.timings,
                              raw_version=tables.raw_version, queries=len(ev.queries), submissions=submission_files,
                              trained_on=source)
    record.write(out / "record.json")
    table = written["table.md"].read_text()
    context.log.debug("\n" + table)   # the table is the materialisation's metadata; circot run prints it
    cot = ev.metrics.get("cot", {})
    metadata = {
        "record": dg.MetadataValue.json(record.to_dict()),
        "path": dg.MetadataValue.path(str(out)), "model_version": trained.version, "split": split,
        "trained_on": source, "zero_shot": source != spec.name,
        "queries": len(ev.queries), "table": dg.MetadataValue.md(table),
        "metrics": dg.MetadataValue.json(ev.metrics), "headline": ev.headline,
        "recall_plot": png_markdown(written["recall.png"], "Recall@K per method"),
        "qualitative": png_markdown(written["qualitative.png"], "reference, reasoning and top-5"),
        "submissions": dg.MetadataValue.json(submission_files),
        **{f"{m}_queries_per_s": ev.timings[m]["per_s"] for m in ("cot", "no_cot") if m in ev.timings},
    }
    if cot:
        metadata[f"cot_{ev.headline}"] = cot[ev.headline]
    return dg.MaterializeResult(data_version=dg.DataVersion(f"{trained.version}-{split}"), metadata=metadata)


def _verdict_path(record) -> Path:
    """Where the gate writes its verdict on an evaluation: beside the evaluation's report."""
    return Path(record.folder) / "gate.json"


@dg.asset_check(
    asset=evaluation,
    blocking=True,
    partitions_def=dataset_partitions,
    description="Promotion gate: metric floors, CoT not worse than no-CoT, no regression against production",
)
def promotion_gate(context: dg.AssetCheckExecutionContext, gate: GateResource,
                   artifacts: ArtifactStore) -> dg.AssetCheckResult:
    from model_code.evaluation.evaluate import EvaluationRecord

    name = context.partition_key
    record = EvaluationRecord.from_dict(latest_record(context, evaluation, name))
    production = registry.production_metrics(name, record.split)
    if production is not None and production["version"] == record.model_version:
        production = None  # re-evaluating the production model itself: nothing to regress against
    per_query, strata = record.per_query()
    note = (f"evaluated zero-shot from {record.zero_shot_from}: the model was trained on {record.zero_shot_from}, "
            f"not on {name}") if record.zero_shot_from else ""
    verdict = run_gate(record.metrics, record.headline, gate.config(name), production, per_query, strata, note)
    result = {**verdict.to_dict(), "model_version": record.model_version, "split": record.split}
    atomic_write_json(_verdict_path(record), result)
    artifacts.push(_verdict_path(record))   # promoted_model may run on another machine (an object-store root)
    write_model_card(context, record, result)   # README.md beside the model: its card, with this verdict
    explanation = verdict.explain()
    # the verdict is the check's metadata (circot run prints it rule by rule); a failure is an error line too
    (context.log.debug if verdict.passed else context.log.error)(f"promotion gate {name}:\n{explanation}")
    return dg.AssetCheckResult(
        passed=verdict.passed, severity=dg.AssetCheckSeverity.ERROR,
        description=f"{'passed' if verdict.passed else 'FAILED'}: {verdict.headline} {verdict.value:.4f}"
                    + (f" (zero-shot from {record.zero_shot_from})" if record.zero_shot_from else "") + "; "
                    + "; ".join(c.name for c in verdict.checks if not c.passed),
        metadata={"verdict": dg.MetadataValue.md(explanation), "model_version": record.model_version,
                  "production_version": production["version"] if production else "none",
                  "trained_on": record.trained_on,
                  verdict.headline: verdict.value})


class PromotionConfig(dg.Config):
    stage: str = Field(default="production", description="production (archives the previous one) or candidate.")
    force: bool = Field(default=False, description="Promote even a model an operator rolled back.")


@dg.asset(
    partitions_def=dataset_partitions,
    group_name="evaluation",
    deps=[evaluation],
    kinds={"bentoml"},
    description="The gated model in the BentoML model store as cir-cot, production for this dataset, "
    "with lineage labels",
)
def promoted_model(context: dg.AssetExecutionContext, config: PromotionConfig,
                   artifacts: ArtifactStore) -> dg.MaterializeResult:
    from model_code.evaluation.evaluate import EvaluationRecord
    from model_code.model.recipes import TrainedModel

    name = context.partition_key
    record = EvaluationRecord.from_dict(latest_record(context, evaluation, name))
    verdict_file = _verdict_path(record)
    verdict = json.loads(verdict_file.read_text()) if verdict_file.is_file() else None
    # the blocking check stops this asset in the run that evaluated; re-checked here for runs that
    # materialise promoted_model alone
    if verdict is None or verdict["model_version"] != record.model_version:
        raise dg.Failure(description=f"no gate verdict for model {record.model_version} on {name}: run the evaluation")
    if not verdict["passed"]:
        raise dg.Failure(description=f"model {record.model_version} failed the promotion gate on {name}")
    trained = TrainedModel.from_dict(record.model)  # exactly the model that was evaluated
    labels, metadata = registry.lineage(trained, record, verdict)
    result = registry.promote(trained.path, version=trained.version, dataset=name, labels=labels, metadata=metadata,
                              stage=config.stage, force=config.force)
    context.log.info(f"promoted_model: {result['reason']}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"{result['tag']}:{result['stage']}"),
        metadata={"tag": result["tag"], "stage": result["stage"], "changed": result["changed"],
                  "previous_production": result["previous"] or "none", "reason": result["reason"],
                  "labels": dg.MetadataValue.json(labels)})
