"""What the per-dataset assets share: the dataset and training partitions (docs/architecture.md §3), which
model each dataset is evaluated with, and the way a data-quality report becomes an asset check result."""

import base64
import json
import shutil
import warnings
from pathlib import Path

import dagster as dg

from model_code.benchmarks import model_source, names, training_names
from model_code.common import atomic_write_json
from model_code.data.quality import QualityReport
from model_code.model_card import card_for_evaluation
from model_code.settings import PipelineSettings, load

# the per-partition checks (each dataset's suites, gate and index check) use a preview feature of Dagster
# on purpose: said once here, not once per check definition on every load
warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec",
                        category=dg.PreviewWarning)

dataset_partitions = dg.StaticPartitionsDefinition(list(names()))
# cir_cot_model: one model per benchmark with a train split
training_partitions = dg.StaticPartitionsDefinition(list(training_names()))


# the training dataset whose model evaluates, zero-shot, each benchmark without a train split
# (CIRCOT_ZERO_SHOT_SOURCE), read once when the code location loads: the asset graph's mapping, the
# sensors and the command line all use this one value (an unusable one: the default, and runs refuse
# to start)
ZERO_SHOT_SOURCE = load(PipelineSettings)[0].zero_shot_source


def model_source_mapping(zero_shot_source: str = ZERO_SHOT_SOURCE) -> dg.StaticPartitionMapping:
    """evaluation[d] reads cir_cot_model[t]: the model trained on d, or for a benchmark without a train
    split the model of ``zero_shot_source``."""
    evaluated: dict[str, list[str]] = {t: [] for t in training_names()}
    for d in names():
        evaluated[model_source(d, zero_shot_source).name].append(d)
    return dg.StaticPartitionMapping(evaluated)


def check_result(report: QualityReport, **metadata) -> dg.AssetCheckResult:
    """A blocking-grade (ERROR) check result whose metadata carries the readable report."""
    return dg.AssetCheckResult(
        passed=report.success, severity=dg.AssetCheckSeverity.ERROR,
        description=report.to_text().splitlines()[0],
        metadata={"report": dg.MetadataValue.md(report.to_markdown()),
                  "failed_expectations": len(report.failed), "expectations": len(report.outcomes), **metadata})


def png_markdown(path: str | Path | None, alt: str) -> dg.MetadataValue:
    """A PNG inlined in a markdown metadata value (shown in the Dagster UI), or a note without one."""

    if not path:
        return dg.MetadataValue.md(f"(no {alt})")
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{data})")


CHECKS_FOLDER = "checks"
TABLE_CHECKS = ("triplets_suite", "images_suite")  # the blocking checks a triplets version must pass
ANNOTATION_CHECKS = ("annotations_suite",)
FEEDBACK_CHECKS = ("feedback_suite",)   # the blocking check a feedback set must pass before training reads it


def artifact_store(context):
    """The run's artifact store (the ``artifacts`` resource, which every asset and check that reads
    or writes artifacts declares)."""
    store = getattr(context.resources, "artifacts", None)
    if store is None:
        raise dg.DagsterInvariantViolationError("this step reads artifacts but does not declare the 'artifacts' "
                                                "resource (add `artifacts: ArtifactStore` to its parameters)")
    return store


@dg.success_hook(name="push_artifacts", required_resource_keys={"artifacts"})
def push_artifacts(context: dg.HookContext) -> None:
    """After each asset's step: upload the folders its record names to the object store (when the
    artifacts root is one), so a stage on another machine can pull them."""
    store = artifact_store(context)
    for record in context.instance.all_logs(context.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        if record.dagster_event.step_key != context.step_key:
            continue
        metadata = record.dagster_event.event_specific_data.materialization.metadata
        if "record" in metadata:
            store.sync_record_paths(metadata["record"].value, "push")


def publish_version(staging: Path, folder: Path) -> Path:
    """Move a freshly written ``staging`` folder to ``folder`` (named by its content version). A
    version already published holds the same bytes: it is kept (with its check results) and the
    staging copy dropped."""

    if folder.is_dir():
        shutil.rmtree(staging)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(folder)
    return folder



def record_check(context, folder: str | Path, check: str, passed: bool, **details) -> None:
    """Note beside a version's files whether the blocking check ``check`` passed on it (and send the
    note to the object store, when the artifacts root is one)."""

    atomic_write_json(Path(folder) / CHECKS_FOLDER / f"{check}.json", {"passed": passed, **details})
    artifact_store(context).push(Path(folder) / CHECKS_FOLDER / f"{check}.json")


def write_model_card(context, record, verdict: dict) -> Path | None:
    """The model card (``README.md``, model_code/model_card.py) beside the model ``record`` (an
    ``EvaluationRecord``) evaluated, with the gate's ``verdict`` and the model's other evaluations;
    uploaded when the artifacts root is an object store. None when the model folder is not here."""

    path = card_for_evaluation(record, verdict)
    if path is None:
        context.log.warning(f"model {record.model_version}: its folder is not on this machine; no model card written")
        return None
    artifact_store(context).push(path)
    context.log.info(f"model card: {path}")
    return path


def checks_passed(folder: str | Path, checks: tuple[str, ...]) -> bool:

    for check in checks:
        path = Path(folder) / CHECKS_FOLDER / f"{check}.json"
        try:
            if not json.loads(path.read_text()).get("passed"):
                return False
        except (OSError, ValueError):
            return False
    return True


class NotMaterialised(dg.Failure):
    """:func:`latest_record`: the asset (partition) has never been materialised in this instance."""


class NoVersionPassed(dg.Failure):
    """:func:`latest_record`: materialised, but no recent version passed the blocking checks asked for."""


def latest_record(context, asset, partition: str | None = None, *, passed: tuple[str, ...] = (),
                  folder_field: str = "folder", history: int = 50) -> dict:
    """The typed record (metadata ``record``) of the newest materialisation of ``asset`` (a key, an
    asset definition or a name), for ``partition`` when it is partitioned: what Dagster's lineage
    says the upstream is, not whichever file a run wrote last. With ``passed`` (blocking checks),
    the newest materialisation whose version passed all of them: one rejected by a check never
    replaces the one that passed (each version keeps its own folder, ``record[folder_field]``). Raises
    :class:`NotMaterialised` when there is none, :class:`NoVersionPassed` when none passed, and a plain
    ``dg.Failure`` for a materialisation without a record."""
    store = artifact_store(context)
    key = asset if isinstance(asset, dg.AssetKey) else getattr(asset, "key", None) or dg.AssetKey(asset)
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None),
        limit=history if passed else 1).records
    label = key.to_user_string() + (f"[{partition}]" if partition else "")
    if not records:
        raise NotMaterialised(description=f"{label} has not been materialised in this Dagster instance: "
                                          "materialise it first")
    for entry in records:
        metadata = entry.asset_materialization.metadata
        if "record" not in metadata:
            raise dg.Failure(description=f"the newest materialisation of {label} carries no record (made by an "
                                         f"older version of the pipeline): materialise it again")
        record = metadata["record"].value
        store.sync_record_paths(record, "pull")   # another machine may have written it (an object-store root)
        if not passed:
            return record
        folder = Path(str(record[folder_field]))
        if checks_passed(folder if folder.is_dir() else folder.parent, passed):
            return record
    raise NoVersionPassed(description=f"no materialisation of {label} passed its checks ({', '.join(passed)}): fix "
                                      f"the data and materialise it again")
