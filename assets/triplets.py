"""triplets[d]: the benchmark in the normalised tables of docs/architecture.md §4, gated by data-quality suites.

Writes ``<artifacts>/triplets/<d>/{triplets,images}.parquet`` and ``meta.json`` (its
``TablesRecord``: where the tables are and the raw data version they were built from, also the
asset's ``record`` metadata). Two blocking checks run the Great Expectations suites: nothing
downstream is built from a table that fails them.
"""


import os

import dagster as dg
from pydantic import Field

from assets.common import check_result, dataset_partitions, latest_record, publish_version, record_check
from assets.raw_dataset import raw_dataset
from assets.resources import ArtifactStore
from model_code.benchmarks import benchmark
from model_code.common import content_hash
from model_code.data import DataError, read_dataset, read_tables, write_tables
from model_code.data.quality import validate_images, validate_triplets
from model_code.data.tables import TablesRecord


class TripletsConfig(dg.Config):
    require_images: bool = Field(
        default=True,
        description="Require every image on disk. False reads the annotations alone (e.g. before the "
                    "images are downloaded); the images check then skips the files.")
    category: str | None = Field(default=None, description="One category of a benchmark with several galleries "
                                                           "(FashionIQ: dress, shirt or toptee); all when unset.")

def triplets_dir(artifacts: ArtifactStore, dataset: str):
    return artifacts.dir("triplets", dataset)

@dg.asset(partitions_def=dataset_partitions, group_name="data", deps=[raw_dataset], kinds={"parquet"},
          description=__doc__.split("\n\n")[0])
def triplets(
    context: dg.AssetExecutionContext, config: TripletsConfig, artifacts: ArtifactStore
) -> dg.MaterializeResult:
    spec = benchmark(context.partition_key)
    name = spec.name
    if config.category is not None and config.category not in spec.categories:
        raise dg.Failure(description=f"{spec.title} has no category {config.category!r}"
                                     + (f" (its categories: {', '.join(spec.categories)})" if spec.categories else
                                        " (it has one gallery)"))
    raw = latest_record(context, raw_dataset, name)
    try:
        bench = read_dataset(spec, raw["root"], category=config.category,
                             require_images=config.require_images)
    except DataError as e:
        raise dg.Failure(description=str(e)) from None
    # written beside the published versions, then moved to a folder of its own version: a table that
    # fails its checks never replaces the one that passed, which downstream keeps reading
    staging = artifacts.dir("triplets", name, f".staging-{os.getpid()}")
    written = write_tables(bench, staging)
    version = content_hash(written.values(), staging)
    out = publish_version(staging, triplets_dir(artifacts, name) / "versions" / version)
    counts = bench.triplets.groupby("split").size().to_dict()
    gallery = bench.images.groupby("split").size().to_dict()
    record = TablesRecord(dataset=name, folder=str(out), root=raw["root"], raw_version=raw["version"],
                          version=version, require_images=config.require_images,
                          category=config.category, queries=counts, images=gallery)
    record.write(out / TablesRecord.META)
    per_split = "| split | queries | images |\n|---|---|---|\n" + "\n".join(
        f"| {s} | {counts.get(s, 0)} | {gallery.get(s, 0)} |" for s in sorted(set(counts) | set(gallery)))
    sample = bench.triplets.head(5)[["query_id", "split", "reference_id", "modification", "target_ids"]]
    context.log.info(f"triplets[{name}]: {len(bench.triplets)} queries, {len(bench.images)} images -> {out}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "record": dg.MetadataValue.json(record.to_dict()),
            "path": dg.MetadataValue.path(str(out)),
            "dagster/row_count": len(bench.triplets),
            "images": len(bench.images),
            "per_split": dg.MetadataValue.md(per_split),
            "sample_rows": dg.MetadataValue.md(sample.to_markdown(index=False)),
            "raw_data_version": raw["version"],
            "require_images": config.require_images,
        })

@dg.asset_check(asset=triplets, blocking=True, partitions_def=dataset_partitions,
                description="Great Expectations suite on the triplets table (ids, texts, splits, lists, named images)")
def triplets_suite(context: dg.AssetCheckExecutionContext, artifacts: ArtifactStore) -> dg.AssetCheckResult:
    record = TablesRecord.from_dict(latest_record(context, triplets, context.partition_key))
    bench = read_tables(record.folder)
    report = validate_triplets(bench.triplets, bench.images)
    record_check(context, record.folder, "triplets_suite", report.success)
    if not report.success:
        context.log.error(report.to_text())
    return check_result(report)

@dg.asset_check(
    asset=triplets,
    blocking=True,
    partitions_def=dataset_partitions,
    description="Great Expectations suite on the images table (ids, paths; files present, decodable, sized)",
)
def images_suite(context: dg.AssetCheckExecutionContext, artifacts: ArtifactStore) -> dg.AssetCheckResult:
    record = TablesRecord.from_dict(latest_record(context, triplets, context.partition_key))
    bench = read_tables(record.folder)
    report = validate_images(bench.images, record.root if record.require_images else None)
    record_check(context, record.folder, "images_suite", report.success)
    if not report.success:
        context.log.error(report.to_text())
    return check_result(report)
