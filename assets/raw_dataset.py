"""raw_dataset[d]: the benchmark's raw files, versioned by DVC.

``synthetic`` is the output of the DVC stage of the same name: reproduced (or pulled from the
remote when it already holds this version) and pushed. A real benchmark is read from its configured
root; its version is the DVC hash when a ``.dvc`` file tracks the root, else an md5 of its
annotation files. The version becomes the asset's data version; the record (root, version, splits)
is the asset's ``record`` metadata, which the stages downstream read through Dagster's lineage.
"""


import dagster as dg

from assets.common import dataset_partitions
from assets.resources import ArtifactStore, DatasetRoots, DvcResource
from model_code.benchmarks import benchmark
from model_code.common import content_hash
from model_code.data import annotation_files, available_splits


@dg.asset(partitions_def=dataset_partitions, group_name="data", kinds={"dvc"},
          description=__doc__.split("\n\n")[0])
def raw_dataset(context: dg.AssetExecutionContext, datasets: DatasetRoots, dvc: DvcResource,
                artifacts: ArtifactStore) -> dg.MaterializeResult:
    name = context.partition_key
    project = dvc.project(echo=context.log.info)
    stage = benchmark(name).dvc_stage
    if stage:
        (out,) = project.reproduce(stage)
        if dvc.push:
            project.push(stage)
        root = project.root / out.path
        record = {"version": out.md5, "versioned_by": f"dvc stage '{stage}'", "nfiles": out.nfiles,
                  "size_bytes": out.size}
    else:
        root = datasets.root(name, must_exist=False)
        tracked = project.tracked_hash(root)
        if tracked is not None and not (root.is_dir() and any(root.iterdir())):
            project.pull_path(root)  # a DVC-tracked root that this machine has not pulled yet
        root = datasets.root(name)
        files = annotation_files(name, root)
        if not files:
            raise dg.Failure(description=f"{name}: no annotation files under {root}; "
                                         f"expected {benchmark(name).root_layout}")
        record = (
            {"version": tracked, "versioned_by": f"dvc file {root.name}.dvc"}
            if tracked
            else {
                "version": content_hash(files, root),
                "versioned_by": "md5 of the annotation files (not tracked by DVC)",
            }
        )
        record["annotation_files"] = len(files)
    record.update(dataset=name, root=str(root.resolve()), splits=available_splits(name, root))
    context.log.info(f"raw_dataset[{name}] at {root}: version {record['version']}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(record["version"]),
        metadata={
            "record": dg.MetadataValue.json(record),
            "path": dg.MetadataValue.path(str(root)),
            "data_version": record["version"],
            "versioned_by": record["versioned_by"],
            "splits": ", ".join(record["splits"]),
            **{k: record[k] for k in ("nfiles", "size_bytes", "annotation_files") if record.get(k) is not None},
        },
    )

