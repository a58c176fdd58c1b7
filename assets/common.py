"""What the per-dataset assets share: the dataset partitions (DESIGN.md §3) and the way a
data-quality report becomes an asset check result."""

from pathlib import Path

import dagster as dg

from model_code.data import DATASETS
from model_code.data.quality import QualityReport

dataset_partitions = dg.StaticPartitionsDefinition(list(DATASETS))


def check_result(report: QualityReport, **metadata) -> dg.AssetCheckResult:
    """A blocking-grade (ERROR) check result whose metadata carries the readable report."""
    return dg.AssetCheckResult(
        passed=report.success, severity=dg.AssetCheckSeverity.ERROR,
        description=report.to_text().splitlines()[0],
        metadata={"report": dg.MetadataValue.md(report.to_markdown()),
                  "failed_expectations": len(report.failed), "expectations": len(report.outcomes), **metadata})


def png_markdown(path: str | Path | None, alt: str) -> dg.MetadataValue:
    """A PNG inlined in a markdown metadata value (shown in the Dagster UI), or a note without one."""
    import base64

    if not path:
        return dg.MetadataValue.md(f"(no {alt})")
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{data})")


def latest_record(context, asset, partition: str | None = None) -> dict:
    """The typed record (metadata ``record``) of the newest materialisation of ``asset`` (a key, an
    asset definition or a name), for ``partition`` when it is partitioned: what Dagster's lineage
    says the upstream is, not whichever file a run wrote last."""
    key = asset if isinstance(asset, dg.AssetKey) else getattr(asset, "key", None) or dg.AssetKey(asset)
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1).records
    label = key.to_user_string() + (f"[{partition}]" if partition else "")
    if not records:
        raise dg.Failure(
            description=f"{label} has not been materialised in this Dagster instance: materialise it first"
        )
    metadata = records[0].asset_materialization.metadata
    if "record" not in metadata:
        raise dg.Failure(description=f"the newest materialisation of {label} carries no record (made by an older "
                                     f"version of the pipeline): materialise it again")
    return metadata["record"].value
