"""gallery_index[d]: the dataset's gallery embedded by its production model into LanceDB (docs/architecture.md §3, §7).

After ``promoted_model[d]``: the images of the scored split (and of the split with hidden targets,
where the tables have one; more with the ``extra_splits`` option, e.g. the train split for the
feedback loop) are embedded by the production model of ``d`` into the table
``gallery_<d>`` (model_code/index.py), whose version is tagged with the model version. The
blocking check ``index_recall`` (:func:`verify_index`) fails when the index is not the model's
embedding of the evaluated gallery: an image of the scored split missing or one too many, a row count
other than the build's, a sample of the gallery's stored vectors that the model, embedding the same
images now as the evaluation does, does not reproduce (cosine below 0.99); and, whenever the version
has an ANN index, recall@10 of the ANN search against exact search below 0.95 on a sample of the
split's queries. (Below 50,000 images the index is searched exactly over the stored vectors, so the
recall alone would be 1.0 by construction: the vectors themselves are what can be wrong there.)
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

MIN_RECALL = 0.95      # recall@10 of an ANN index against exact search
MIN_COSINE = 0.99      # a stored vector against the model's embedding of its image now (bf16 on a GPU: > 0.999)


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
                     f"({info.index_type}), table version {info.table_version}")
    context.log.debug(f"an example query through the index:\n{example}")
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
    sample: int = Field(default=64, ge=1, description="Queries of the scored split whose ANN results are compared "
                                                      "with exact search (where the index has an ANN index).")
    images: int = Field(default=64, ge=1, description="Gallery images of the scored split embedded again and "
                                                      "compared with their stored vectors.")
    min_cosine: float = Field(default=MIN_COSINE, gt=0, le=1,
                              description="The lowest cosine a stored vector may have with the model's embedding "
                                          "of its image now.")
    batch_size: int = Field(default=32, ge=1, description="Images / queries per forward pass.")


@dataclasses.dataclass
class IndexVerdict:
    """What :func:`verify_index` found: the check's result."""

    passed: bool
    description: str
    metadata: dict


def _spread(n: int, k: int) -> list[int]:
    """``k`` positions spread evenly over ``range(n)`` (all of them when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return sorted({round(j * (n - 1) / max(k - 1, 1)) for j in range(k)})


def verify_index(gallery_index_, model_version: str, model, bench, root: str, dataset: str, *,
                 skipped=(), rows: int | None = None, images: int = 64, queries: int = 64,
                 min_cosine: float = MIN_COSINE, batch_size: int = 32) -> IndexVerdict:
    """Whether the index built for ``model_version`` is ``model``'s embedding of the gallery the
    evaluation scores (the scored split's images, ``model_code.evaluation.evaluate.groups``):

    - ids and count: every image of that gallery has a row (but the ``skipped``
      ones), no other row claims that split, and the index holds the ``rows`` its build recorded;
    - values: ``images`` of them, spread over the gallery, embedded now by ``model.embed_images``
      (what the evaluation embeds the gallery with) have a cosine of at least ``min_cosine`` with
      their stored vectors;
    - an ANN index, where the version has one: recall@10 against exact search over the stored
      vectors of at least ``MIN_RECALL`` on the first ``queries`` queries of the split.
    """
    from model_code.evaluation.evaluate import groups

    spec = benchmark(dataset)
    split = spec.scored_split
    evaluated: dict[str, Path] = {}
    for group in groups(bench, root, spec, split):
        evaluated.update(zip(group.gallery_ids, group.gallery_paths))
    stored_splits = gallery_index_.splits(model_version)
    skip = set(skipped)
    expected = [i for i in evaluated if i not in skip]
    # an image of several splits (CIRCO's val and test share one gallery) has one row, under one of them
    missing = [i for i in expected if i not in stored_splits]
    extra = sorted({i for i, s in stored_splits.items() if s == split} - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the {len(expected)} images of {split} the evaluation ranks are not in the "
                        f"index (first: {', '.join(missing[:3])})")
    if extra:
        problems.append(f"{len(extra)} rows of split {split} are not images of the evaluated gallery "
                        f"(first: {', '.join(extra[:3])})")
    if rows is not None and len(stored_splits) != rows:
        problems.append(f"the index holds {len(stored_splits)} rows, its build recorded {rows}")

    present = [i for i in expected if i in stored_splits]
    sample = [present[j] for j in _spread(len(present), images)]
    agreement = None
    if sample:
        fresh = model.embed_images([evaluated[i] for i in sample], batch_size=batch_size)
        agreement = gallery_index_.agreement(model_version, sample, fresh.float().numpy(), min_cosine=min_cosine)
        if agreement.other_space:
            problems.append(f"the stored vectors are not the model's: {agreement.other_space}")
        elif agreement.differ:
            problems.append(f"{len(agreement.differ)} of {len(sample)} stored vectors differ from the model's "
                            f"embedding of their image (cosine down to {agreement.min_cosine:.4f}, floor "
                            f"{min_cosine}; first: {', '.join(agreement.differ[:3])}): the index was built by "
                            f"another model or changed after its build")
    elif not missing:
        problems.append(f"the index has no image of {split}")

    recall, n_queries = None, 0
    if gallery_index_.has_ann(model_version):
        qs = bench.triplets[bench.triplets["split"] == split].iloc[:queries]
        paths = image_paths(bench.images, root)
        emb = model.embed_queries([paths[(split, r)] for r in qs["reference_id"]], list(qs["modification"]),
                                  batch_size=batch_size).float().numpy()
        exclude = reference_exclusions(dataset, list(qs["reference_id"]))
        recall, n_queries = gallery_index_.recall_against_exact(emb, 10, model_version, exclude=exclude), len(emb)
        if recall < MIN_RECALL:
            problems.append(f"recall@10 of the ANN index against exact search {recall:.3f} over {n_queries} queries "
                            f"(floor {MIN_RECALL})")

    compared = (f"{len(sample)} stored vectors of {len(present)} images of {split} re-embedded: cosine >= "
                f"{agreement.min_cosine:.4f}" if agreement is not None and not agreement.other_space else
                "no stored vector compared")
    ann = (f"recall@10 of the ANN index against exact search {recall:.3f} over {n_queries} queries"
           if recall is not None else "no ANN index (searched exactly over the stored vectors)")
    description = ("FAILED: " + "; ".join(problems) if problems else
                   f"the index is the model's embedding of the evaluated gallery: {len(expected)} images of {split}, "
                   f"{len(stored_splits)} rows in all; {compared}") + f"; {ann}"
    metadata = {
        "images_of_split": len(expected), "rows": len(stored_splits), "missing": len(missing), "extra": len(extra),
        "vectors_compared": len(sample), "vectors_differing": len(agreement.differ) if agreement else 0,
        "min_cosine": agreement.min_cosine if agreement and not agreement.other_space else None,
        "max_abs_difference": agreement.max_abs_difference if agreement and not agreement.other_space else None,
        "ann_recall_at_10": recall, "queries": n_queries}
    return IndexVerdict(not problems, description, {k: v for k, v in metadata.items() if v is not None})


@dg.asset_check(asset=gallery_index, blocking=True, partitions_def=dataset_partitions,
                description="The index is the production model's embedding of the evaluated gallery (ids, count, "
                            f"vectors within cosine {MIN_COSINE}); an ANN index's recall@10 against exact search "
                            f">= {MIN_RECALL}")
def index_recall(context: dg.AssetCheckExecutionContext, config: IndexRecallConfig, index: IndexResource,
                 artifacts: ArtifactStore) -> dg.AssetCheckResult:


    name = context.partition_key
    record = latest_record(context, gallery_index, name)
    tables = TablesRecord.from_dict(latest_record(context, triplets, name, passed=TABLE_CHECKS))
    bench = read_tables(tables.folder)
    model = registry.load_promoted(tag=f"cir-cot:{record['model_version']}")
    try:
        verdict = verify_index(index.open(name, artifacts), record["model_version"], model, bench, tables.root, name,
                               skipped=record.get("skipped", ()), rows=record.get("rows"), images=config.images,
                               queries=config.sample, min_cosine=config.min_cosine, batch_size=config.batch_size)
    except GalleryIndexError as e:
        raise dg.Failure(description=str(e)) from None
    return dg.AssetCheckResult(
        passed=verdict.passed, severity=dg.AssetCheckSeverity.ERROR, description=verdict.description,
        metadata={**verdict.metadata, "index_type": record["index_type"]})
