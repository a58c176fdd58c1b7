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
