"""base_model and cir_cot_model: the backbone, then the LoRA-tuned CIR-CoT model (DESIGN.md §5).

``base_model`` bootstraps the tiny Qwen2-VL on cir-shapes (profile ``embedded``) or registers a
local checkpoint (profile ``gpu``); ``cir_cot_model`` trains the two LoRA stages on the accepted
annotations of the training datasets. Runs are keyed by their inputs and configuration under the
artifacts root, so an interrupted materialisation resumes from its last checkpoint.
"""

import dataclasses
import json

import dagster as dg
from pydantic import Field

from model_code.common import json_key
from assets.common import png_markdown
from assets.cot_annotations import annotations_dir, cot_annotations
from assets.resources import ArtifactStore, TrainingResource
from assets.triplets import triplets, triplets_dir

TRAIN_DATASETS = ["synthetic"]  # the partitions whose annotations the model trains on
_training_partitions = dg.SpecificPartitionsPartitionMapping(TRAIN_DATASETS)


def _dataset_inputs(artifacts: ArtifactStore, dataset: str):
    from model_code.annotation.store import read_annotations
    from model_code.data import read_tables

    tables_dir, ann_dir = triplets_dir(artifacts, dataset), annotations_dir(artifacts, dataset)
    if not (ann_dir / "annotations.parquet").is_file():
        raise dg.Failure(description=f"cot_annotations[{dataset}] has not been materialised ({ann_dir})")
    meta = json.loads((tables_dir / "meta.json").read_text())
    ann_meta = json.loads((ann_dir / "meta.json").read_text())
    return read_tables(tables_dir), read_annotations(ann_dir / "annotations.parquet"), meta, ann_meta


class BaseModelConfig(dg.Config):
    bootstrap_steps: int | None = Field(default=None, description="Override the profile's bootstrap steps (tiny).")


@dg.asset(group_name="model", kinds={"pytorch"}, description=__doc__.split("\n\n")[0],
          deps=[dg.AssetDep(triplets, partition_mapping=_training_partitions),
                dg.AssetDep(cot_annotations, partition_mapping=_training_partitions)])
def base_model(context: dg.AssetExecutionContext, config: BaseModelConfig, training: TrainingResource,
               artifacts: ArtifactStore) -> dg.MaterializeResult:
    from model_code.model.recipes import bootstrap_tiny, register_checkpoint

    profile = training.spec()
    spec = profile.base
    if spec.kind == "checkpoint":
        try:
            summary = register_checkpoint(spec.checkpoint_path)
        except FileNotFoundError as e:
            raise dg.Failure(description=str(e)) from None
    else:
        if config.bootstrap_steps:
            spec.bootstrap.steps = config.bootstrap_steps
        bench, ann, meta, ann_meta = _dataset_inputs(artifacts, "synthetic")
        run = artifacts.dir("base_model", f"tiny-{json_key(meta['raw_version'], ann_meta['version'], dataclasses.asdict(spec))}")
        summary = bootstrap_tiny("synthetic", meta["root"], bench.triplets, ann, spec, run, progress=context.log.info)
    artifacts.path("base_model", "current.json").write_text(json.dumps(summary, indent=1))
    metadata = {"path": dg.MetadataValue.path(summary["path"]), "kind": summary["kind"], "model_version": summary["version"]}
    if summary["kind"] == "tiny":
        metadata.update({
            "parameters": summary["parameters"]["total"], "steps": summary["steps"], "wall_time_s": summary["seconds"],
            "loss_first": summary["first"]["loss"], "loss_last": summary["last"]["loss"],
            "val_in_batch_accuracy": summary["val"]["acc"], "plot": png_markdown(summary.get("plot"), "training curves"),
        })
    return dg.MaterializeResult(data_version=dg.DataVersion(summary["version"]), metadata=metadata)


class CirCoTModelConfig(dg.Config):
    align_steps: int | None = Field(default=None, description="Override the profile's stage-1 steps.")
    cot_steps: int | None = Field(default=None, description="Override the profile's stage-2 steps.")


@dg.asset(group_name="model", kinds={"pytorch"}, description="The CIR-CoT model: LoRA stage 1 (no CoT) then stage 2 (CoT, joint loss)",
          deps=[base_model, dg.AssetDep(cot_annotations, partition_mapping=_training_partitions)])
def cir_cot_model(context: dg.AssetExecutionContext, config: CirCoTModelConfig, training: TrainingResource,
                  artifacts: ArtifactStore) -> dg.MaterializeResult:
    from model_code.model.recipes import pair_examples, train_cir_cot

    profile = training.spec()
    if config.align_steps:
        profile.align.steps = config.align_steps
    if config.cot_steps:
        profile.cot.steps = config.cot_steps
    base_file = artifacts.path("base_model", "current.json")
    if not base_file.is_file():
        raise dg.Failure(description="base_model has not been materialised")
    base = json.loads(base_file.read_text())
    train_pairs, val_pairs, versions = [], [], {}
    for dataset in TRAIN_DATASETS:
        bench, ann, meta, ann_meta = _dataset_inputs(artifacts, dataset)
        train_pairs += pair_examples(bench.triplets, bench.images, meta["root"], "train", ann)
        val_pairs += pair_examples(bench.triplets, bench.images, meta["root"], "val", ann)
        versions[dataset] = {"raw": meta["raw_version"], "annotations": ann_meta["version"],
                             "teacher": ann_meta["teacher"], "prompt_version": ann_meta["prompt_version"]}
    run = artifacts.dir("cir_cot_model", "runs", json_key(base["version"], versions, profile.to_dict()))
    summary = train_cir_cot(base, train_pairs, val_pairs, profile, run, progress=context.log.info)
    summary["data"] = versions
    artifacts.path("cir_cot_model", "latest.json").write_text(json.dumps(summary, indent=1))
    align, cot = summary["stages"]["align"], summary["stages"]["cot"]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(summary["version"]),
        metadata={
            "path": dg.MetadataValue.path(summary["path"]), "model_version": summary["version"],
            "base_version": summary["base_version"], "data_versions": dg.MetadataValue.json(versions),
            "parameters_total": summary["parameters"]["total"], "parameters_trainable": summary["parameters"]["trainable"],
            "align_steps": align["steps"], "cot_steps": cot["steps"],
            "wall_time_s": round(align["seconds"] + cot["seconds"], 1),
            "align_loss": f"{align['first']['loss']:.3f} -> {align['last']['loss']:.3f}",
            "cot_loss": f"{cot['first']['loss']:.3f} -> {cot['last']['loss']:.3f}",
            "val_in_batch_accuracy_align": align["val"]["acc"] if align["val"] else None,
            "val_in_batch_accuracy_cot": cot["val"]["acc"] if cot["val"] else None,
            "plot": png_markdown(summary["plot"], "training curves"),
        })
