"""base_model and cir_cot_model[t]: the backbone, then one fine-tuned CIR-CoT model per training dataset.

``base_model`` registers the pretrained embedded base shipped in the repository (profile
``embedded``) or a local checkpoint (profiles ``gpu``, ``micro`` and ``smoke``); ``cir_cot_model[t]``
trains the two stages (every parameter of the embedded base, LoRA on a real checkpoint) on the train
split of ``t`` and the teacher chains of it that passed ``annotations_suite`` (and its accepted
feedback), as the paper fine-tunes one model per benchmark; the partitions are the benchmarks with a
train split. Each reads its inputs' records through Dagster's lineage (the newest materialisation of
the upstream asset) and hands its own on as ``record`` metadata (``BaseModelRecord``,
``TrainedModel``). Runs are keyed by their inputs and configuration under the artifacts root, so an
interrupted materialisation resumes from its last checkpoint and a finished one is not repeated.
"""

from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.common import (
    ANNOTATION_CHECKS,
    FEEDBACK_CHECKS,
    TABLE_CHECKS,
    NotMaterialised,
    NoVersionPassed,
    latest_record,
    png_markdown,
    training_partitions,
)
from assets.cot_annotations import cot_annotations
from assets.feedback import feedback_triplets
from assets.resources import ArtifactStore, TrainingResource
from assets.triplets import triplets
from model_code.annotation.store import AnnotationsRecord, read_annotations, write_annotations
from model_code.benchmarks import benchmark
from model_code.common import json_key
from model_code.data import Benchmark, read_tables, write_tables
from model_code.data.tables import TablesRecord
from model_code.feedback_tables import FeedbackRecord, read_feedback_tables
from model_code.settings import PipelineSettings, load

_same_dataset = dg.IdentityPartitionMapping()   # cir_cot_model[t] reads the data of t


def _feedback_inputs(context, dataset: str, bench, tables: TablesRecord, run_root: Path, weight: float):
    """The accepted feedback of ``dataset`` (the newest ``feedback_triplets`` version that passed its
    check) as a tables folder of its own, each triplet written ``weight`` times (a fraction: that
    share of them once more) beside the benchmark's images, with its annotations: what training
    reads as one more (tables, annotations) pair. None when there is none (or ``weight`` is 0)."""
    if weight <= 0:
        return None
    # no feedback yet (never materialised, or no version accepted by its check: a rejected version is never read)
    # is said and trained without; any other failure to read it (a materialisation without a record, a version
    # whose files are gone) fails the training rather than silently leaving the feedback out
    try:
        record = FeedbackRecord.from_dict(latest_record(context, feedback_triplets, dataset, passed=FEEDBACK_CHECKS))
    except NotMaterialised:
        context.log.info(f"{dataset}: no feedback set yet (feedback_triplets[{dataset}] never materialised): "
                         "training on the benchmark alone")
        return None
    except NoVersionPassed as e:
        context.log.warning(f"{dataset}: no feedback set to train on: {e.description}; training on the benchmark "
                            "alone")
        return None
    feedback = read_feedback_tables(record.folder)
    if not len(feedback.triplets):
        context.log.info(f"{dataset}: the feedback set {record.version} has no accepted triplet yet: training on the "
                         "benchmark alone")
        return None
    if not record.annotations.is_file():
        raise dg.Failure(description=f"the feedback set {record.version} of {dataset} has {len(feedback.triplets)} "
                                     f"triplets but its annotations {record.annotations} are missing: materialise "
                                     f"feedback_triplets[{dataset}] again")
    rows = feedback.triplets
    whole, part = int(weight), weight - int(weight)
    weighted = pd.concat([rows] * whole + [rows.iloc[: round(part * len(rows))]], ignore_index=True)
    weighted["query_id"] = [f"{q}#{i}" for i, q in enumerate(weighted["query_id"])]
    annotations = read_annotations(record.annotations)
    by_query = annotations.set_index("query_id")
    repeated = by_query.reindex([q.split("#")[0] for q in weighted["query_id"]]).reset_index()
    repeated["query_id"] = list(weighted["query_id"])
    folder = run_root / "feedback" / dataset / json_key(record.version, weight)
    write_tables(Benchmark(weighted, pd.concat([bench.images, feedback.images], ignore_index=True)), folder)
    TablesRecord(dataset=dataset, folder=str(folder), root=tables.root, raw_version=tables.raw_version,
                 version=record.version).write(folder / TablesRecord.META)
    write_annotations(repeated.dropna(subset=["status"]), folder / "annotations.parquet")
    context.log.info(f"{dataset}: training also on {len(rows)} accepted feedback triplets (version "
                     f"{record.version}, weight {weight:g}: {len(weighted)} examples; {record.person_chains} chains "
                     f"written by people, {record.annotated_ok - record.person_chains} by the teacher)")
    return folder, folder / "annotations.parquet", {
        "version": record.version, "triplets": len(rows), "weight": weight,
        # whose chains: a person's (corrected in the service, then picked) or the teacher's
        "person_chains": record.person_chains, "teacher_chains": record.annotated_ok - record.person_chains}


def _dataset_inputs(context, dataset: str):
    """The tables, annotations and both records of ``dataset``, as its newest materialisations say."""

    tables = TablesRecord.from_dict(latest_record(context, triplets, dataset, passed=TABLE_CHECKS))
    annotations = AnnotationsRecord.from_dict(latest_record(context, cot_annotations, dataset,
                                                            passed=ANNOTATION_CHECKS, folder_field="path"))
    return read_tables(tables.folder), read_annotations(annotations.path), tables, annotations


@dg.asset(group_name="model", kinds={"pytorch"}, description=__doc__.split("\n\n")[0])
def base_model(training: TrainingResource) -> dg.MaterializeResult:
    from model_code.model.recipes import register_checkpoint, register_embedded

    spec = training.spec().base
    try:
        record = register_checkpoint(spec.checkpoint_path) if spec.kind == "checkpoint" else register_embedded()
    except FileNotFoundError as e:
        raise dg.Failure(description=str(e)) from None
    metadata = {"record": dg.MetadataValue.json(record.to_dict()), "path": dg.MetadataValue.path(record.path),
                "kind": record.kind, "model_version": record.version}
    if record.kind == "embedded":   # what its pretraining measured (model_code/model/embedded_base/PRETRAINING.json)
        metadata.update({"pretraining_steps": record.training["steps"],
                         "pretraining_perception": dg.MetadataValue.json(record.training["perception"] or {}),
                         "pretraining_command": record.training["command"]})
    return dg.MaterializeResult(data_version=dg.DataVersion(record.version), metadata=metadata)


class CirCoTModelConfig(dg.Config):
    align_steps: int | None = Field(default=None, ge=1, description="Override the profile's stage-1 steps.")
    cot_steps: int | None = Field(default=None, ge=1, description="Override the profile's stage-2 steps.")


@dg.asset(
    group_name="model",
    kinds={"pytorch"},
    partitions_def=training_partitions,
    pool="training",   # one GPU: `dagster instance concurrency set training 1` trains one dataset at a time
    description="The CIR-CoT model of one training dataset: stage 1 (no CoT) then stage 2 (CoT, joint loss) on its "
                "train split and checked chains; LoRA or every parameter",
    deps=[base_model, dg.AssetDep(triplets, partition_mapping=_same_dataset),
          dg.AssetDep(cot_annotations, partition_mapping=_same_dataset),
          dg.AssetDep(feedback_triplets, partition_mapping=_same_dataset)],
)
def cir_cot_model(context: dg.AssetExecutionContext, config: CirCoTModelConfig, training: TrainingResource,
                  artifacts: ArtifactStore) -> dg.MaterializeResult:
    from model_code.model.recipes import BaseModelRecord, TrainedModel, pair_examples, train_cir_cot

    spec = benchmark(context.partition_key)
    refusal = training.refusal(spec.name)   # before any work: a base that cannot read the dataset's texts
    if refusal:
        raise dg.Failure(description=refusal)
    profile = training.spec().with_overrides(
        align={"steps": config.align_steps} if config.align_steps is not None else None,
        cot={"steps": config.cot_steps} if config.cot_steps is not None else None)
    base = BaseModelRecord.from_dict(latest_record(context, base_model))
    bench, ann, tables, annotations = _dataset_inputs(context, spec.name)
    train_pairs = pair_examples(bench.triplets, bench.images, tables.root, spec.train_split, ann)
    val_pairs = pair_examples(bench.triplets, bench.images, tables.root, spec.val_split, ann) if spec.val_split else []
    if not train_pairs:
        raise dg.Failure(description=f"{spec.name}: its tables hold no {spec.train_split!r} query with a target "
                                     f"to train on (splits: {', '.join(sorted(set(bench.triplets['split'])))})")
    versions = {spec.name: {"raw": tables.raw_version, "annotations": annotations.version,
                            "teacher": annotations.teacher, "prompt_version": annotations.prompt_version}}
    inputs = [(tables.folder, annotations.path)]
    weight = load(PipelineSettings)[0].feedback_weight
    feedback = _feedback_inputs(context, spec.name, bench, tables, artifacts.dir("cir_cot_model"), weight)
    if feedback is not None:   # people's picks in the service (docs/feedback.md), never of a held-out split
        folder, annotation_file, versions[spec.name]["feedback"] = feedback
        fb, fb_annotations = read_tables(folder), read_annotations(annotation_file)
        train_pairs += pair_examples(fb.triplets, fb.images, tables.root, spec.train_split, fb_annotations)
        inputs.append((str(folder), str(annotation_file)))
        artifacts.push(folder)   # a launched process on another machine reads it (an object-store root)
    context.log.info(f"cir_cot_model[{spec.name}]: {len(train_pairs)} training pairs "
                     f"({sum(p.cot is not None for p in train_pairs)} with a checked chain), {len(val_pairs)} "
                     f"validation pairs of {spec.val_split}; profile {training.profile}")
    # the run folder is keyed by the inputs, whichever launcher trains: an interrupted run resumes
    run = artifacts.dir("cir_cot_model", "runs", json_key(base.version, versions, profile.to_dict()))
    reported = {}
    if training.launcher == "in_process":
        trained = train_cir_cot(base, train_pairs, val_pairs, profile, run, progress=context.log.info)
    elif training.launcher in ("subprocess", "kubernetes"):
        reported = _launch(context, training, artifacts, base, inputs, run, profile, spec)
        trained = TrainedModel.read(run / "summary.json")
    else:
        raise dg.Failure(description=f"unknown training launcher {training.launcher!r}: in_process, subprocess "
                                     "or kubernetes (CIRCOT_TRAINING_LAUNCHER)")
    trained.data, trained.dataset = versions, spec.name
    trained.write(run / "summary.json")
    align, cot = trained.stage("align"), trained.stage("cot")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(trained.version),
        metadata={**reported,
            "record": dg.MetadataValue.json(trained.to_dict()),
            "path": dg.MetadataValue.path(trained.path), "model_version": trained.version,
            "trained_on": spec.name, "base_version": trained.base_version,
            "data_versions": dg.MetadataValue.json(versions),
            "parameters_total": trained.parameters["total"], "parameters_trainable": trained.parameters["trainable"],
            "align_steps": align.steps, "cot_steps": cot.steps, "training_pairs": align.examples,
            "cot_pairs": cot.examples, "chains_too_long": cot.chains_too_long,
            "wall_time_s": round(align.seconds + cot.seconds, 1),
            "align_loss": f"{align.first['loss']:.3f} -> {align.last['loss']:.3f}",
            "cot_loss": f"{cot.first['loss']:.3f} -> {cot.last['loss']:.3f}",
            "val_in_batch_accuracy_align": align.val["acc"] if align.val else None,
            "val_in_batch_accuracy_cot": cot.val["acc"] if cot.val else None,
            "plot": png_markdown(trained.plot, "training curves"),
        })


def _launch(context, training: TrainingResource, artifacts: ArtifactStore, base, inputs, run, profile, spec) -> dict:
    """Train outside this process through Dagster Pipes: ``training.processes`` local processes
    (torchrun), or a Kubernetes pod (dagster-k8s). The child reads ``profile`` (overrides applied)
    from ``run/profile.json``, streams its log lines here and reports the model it wrote; a child that
    dies fails the run with its last lines, and its checkpoints stay in ``run`` for the next run to
    resume from. Returns the metadata the child reported."""
    from model_code.model.recipes import launch_command

    profile_file = profile.save(run / "profile.json")
    command = launch_command([t for t, _ in inputs], [a for _, a in inputs], base.path, str(profile_file), str(run),
                             train_split=spec.train_split, val_split=spec.val_split, processes=training.processes,
                             python=None if training.launcher == "subprocess" else "python")
    context.log.info(f"training through Pipes ({training.launcher}): {' '.join(command)}")
    if training.launcher == "subprocess":
        client = dg.PipesSubprocessClient(cwd=str(Path.cwd()))
        invocation = client.run(command=command, context=context)
    else:
        try:
            from dagster_k8s import PipesK8sClient
        except ImportError:
            raise dg.Failure(description="launcher 'kubernetes' needs dagster-k8s in the Dagster deployment's image: "
                                         "pip install dagster-k8s==0.29.27 (the release paired with dagster 1.13.27)"
                             ) from None
        invocation = PipesK8sClient().run(context=context, image=training.k8s_image, namespace=training.k8s_namespace,
                                          base_pod_spec=training.pod_spec(command, artifacts.root,
                                                                                str(artifacts.local_root())))
    results = invocation.get_results()
    if not results:
        raise dg.Failure(description="the training process ended without reporting a model (see its log lines)")
    return {k: v for k, v in results[-1].metadata.items() if k not in ("summary",)}
