"""gallery_index[d]: the dataset's gallery embedded by its production model into LanceDB (docs/architecture.md §3, §7).

After ``promoted_model[d]``: the images of the scored split (and of the split with hidden targets,
where the tables have one; more with the ``extra_splits`` option, e.g. the train split for the
feedback loop) are embedded by the production model of ``d`` into the table
``gallery_<d>`` (model_code/index.py), whose version is tagged with the model version. The
blocking check ``index_recall`` runs a sample of the split's queries through the index and through
exact search, and fails below recall@10 0.95 against exact.
"""

import dataclasses
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.common import TABLE_CHECKS, dataset_partitions, latest_record
from assets.evaluation import promoted_model
from assets.resources import ArtifactStore, IndexResource
from assets.triplets import triplets
from model_code import registry
from model_code.benchmarks import benchmark
from model_code.data import read_tables
from model_code.data.tables import TablesRecord, image_paths
from model_code.evaluation.metrics import reference_exclusions
from model_code.index import GalleryImage, GalleryIndexError
from model_code.retrieval import answer
from model_code.settings import PipelineSettings, load

MIN_RECALL = 0.95


class GalleryIndexConfig(dg.Config):
    batch_size: int = Field(default=64, ge=1, description="Images per forward pass.")
    on_bad_image: str = Field(default="fail", description="fail (stop, naming the image) or skip (leave it out).")
    device: str | None = Field(default=None, description="cuda / cpu; default cuda when present.")
    dtype: str = Field(default="auto", description="auto: bfloat16 on a GPU, float32 on the CPU.")
    extra_splits: list[str] | None = Field(
        default=None, description="More splits to serve, e.g. [\"train\"]: feedback on the train split's images can "
                                  "become training data, on the evaluated splits it never does (docs/feedback.md). "
                                  "Unset: CIRCOT_GALLERY_EXTRA_SPLITS (none by default).")


def served_extra_splits(config: GalleryIndexConfig) -> list[str]:
    """The splits served beside the evaluated ones: the run's config, else the deployment's setting."""

    return config.extra_splits if config.extra_splits is not None else load(PipelineSettings)[0].extra_gallery_splits()


def _production(dataset: str) -> dict:

    try:
        return registry.require_production(dataset)
    except LookupError as e:
        raise dg.Failure(description=f"{e}: the gallery is embedded by the production model") from None


def _gallery(dataset: str, bench, root: str, extra_splits=()):
    """The images of the scored split, and of the split with hidden targets where there is one, and
    of ``extra_splits``."""


    unknown = sorted(set(extra_splits) - set(bench.images["split"]))
    if unknown:
        raise dg.Failure(description=f"extra_splits {unknown}: {dataset} has no such split here (its splits: "
                                     f"{', '.join(sorted(set(bench.images['split'])))})")
    splits = {benchmark(dataset).scored_split, benchmark(dataset).submission_split, *extra_splits}
    rows = bench.images[bench.images["split"].isin(splits)]
    return [GalleryImage(i, s, Path(root) / p) for i, s, p in zip(rows["image_id"], rows["split"], rows["path"])]


def _example(model, index, bench, root: str, dataset: str, version: str) -> str:
    """One query of the scored split answered through the index: its reasoning and top 5."""

    split = benchmark(dataset).scored_split
    q = bench.triplets[bench.triplets["split"] == split].iloc[0]
    exclude = reference_exclusions(dataset, [q.reference_id])
    reference = image_paths(bench.images, root)[(split, q.reference_id)]
    a = answer(model, index, version, reference, q.modification, 5, "cot", exclude=exclude[0] if exclude else None)
    targets = set(q.target_ids)
    lines = [f"query {q.query_id}: reference {q.reference_id}, \"{q.modification}\"",
             f"reasoning: {a.reasoning['raw'][:400]}", "top 5:"]
    lines += [f"  {rank}. {i}  {s:.3f}{'  <- target' if i in targets else ''}"
              for rank, (i, s) in enumerate(zip(a.ids, a.scores), 1)]
    return "\n".join(lines)


@dg.asset(partitions_def=dataset_partitions, group_name="serving", deps=[promoted_model], kinds={"lancedb"},
          description=__doc__.split("\n\n")[0])
def gallery_index(context: dg.AssetExecutionContext, config: GalleryIndexConfig, index: IndexResource,
                  artifacts: ArtifactStore) -> dg.MaterializeResult:

    name = context.partition_key
    prod = _production(name)
    tables = TablesRecord.from_dict(latest_record(context, triplets, name, passed=TABLE_CHECKS))
    bench = read_tables(tables.folder)
    # verified by content before it embeds anything (load_promoted: every file's md5, the version from the weights)
    model = registry.load_promoted(dataset=name, device=config.device, dtype=config.dtype, verify=True)
    gallery_index_ = index.open(name, artifacts)
    try:
        info = gallery_index_.build(lambda paths: model.embed_images(paths, batch_size=config.batch_size),
                                    _gallery(name, bench, tables.root, served_extra_splits(config)),
                                    model_version=prod["version"],
                                    batch_size=config.batch_size, on_bad_image=config.on_bad_image,
                                    progress=context.log.info)
    except GalleryIndexError as e:
        raise dg.Failure(description=str(e)) from None
    example = _example(model, gallery_index_, bench, tables.root, name, prod["version"])
    context.log.info(f"gallery_index[{name}]: {info.rows} images of model {info.model_version} "
                     f"({info.index_type}), table version {info.table_version}\n{example}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"{info.model_version}-{info.table_version}"),
        metadata={
            "record": dg.MetadataValue.json({**dataclasses.asdict(info), "uri": gallery_index_.uri}),
            "path": dg.MetadataValue.path(gallery_index_.uri), "rows": info.rows, "dimension": info.dimension,
            "model_version": info.model_version, "table_version": info.table_version, "tag": info.tag,
            "index_type": info.index_type, "index_params": dg.MetadataValue.json(info.index_params),
            "embedded_this_run": info.embedded, "skipped_images": dg.MetadataValue.json(info.skipped),
            "build_seconds": info.seconds, "images_per_s": info.images_per_s,
            "example": dg.MetadataValue.md(f"```\n{example}\n```"),
        })


class IndexRecallConfig(dg.Config):
    sample: int = Field(default=64, ge=1, description="Queries of the scored split to compare.")


@dg.asset_check(asset=gallery_index, blocking=True, partitions_def=dataset_partitions,
                description=f"Recall@10 of the index against exact search on a sample of queries >= {MIN_RECALL}")
def index_recall(context: dg.AssetCheckExecutionContext, config: IndexRecallConfig, index: IndexResource,
                 artifacts: ArtifactStore) -> dg.AssetCheckResult:


    name = context.partition_key
    record = latest_record(context, gallery_index, name)
    tables = TablesRecord.from_dict(latest_record(context, triplets, name, passed=TABLE_CHECKS))
    bench = read_tables(tables.folder)
    split = benchmark(name).scored_split
    queries = bench.triplets[bench.triplets["split"] == split].iloc[:config.sample]
    paths = image_paths(bench.images, tables.root)
    model = registry.load_promoted(tag=f"cir-cot:{record['model_version']}")
    emb = model.embed_queries([paths[(split, r)] for r in queries["reference_id"]],
                              list(queries["modification"])).numpy()
    exclude = reference_exclusions(name, list(queries["reference_id"]))
    recall = index.open(name, artifacts).recall_against_exact(emb, 10, record["model_version"], exclude=exclude)
    passed = recall >= MIN_RECALL
    return dg.AssetCheckResult(
        passed=passed, severity=dg.AssetCheckSeverity.ERROR,
        description=f"recall@10 against exact search {recall:.3f} over {len(emb)} queries "
                    f"({record['index_type']}; floor {MIN_RECALL})",
        metadata={"recall_at_10": recall, "queries": len(emb), "index_type": record["index_type"]})
