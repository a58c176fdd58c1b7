"""The Dagster code location: ``dagster dev`` (``[tool.dagster]`` in pyproject.toml) loads ``defs``.

The jobs and the Definitions; the resources come from the environment through
``assets.resources.resources_from_environment`` (its docstring lists every variable); the schedule
and the sensors from ``orchestration.operations``.
"""

from __future__ import annotations

import dagster as dg

from assets import bento as bento_module
from assets import cot_annotations as cot_annotations_module
from assets import deployment as deployment_module
from assets import evaluation as evaluation_module
from assets import feedback as feedback_module
from assets import gallery_index as gallery_index_module
from assets import raw_dataset as raw_dataset_module
from assets import training as training_module
from assets import triplets as triplets_module
from assets.common import dataset_partitions, training_partitions
from assets.resources import AnnotatorResource, GateResource, TrainingResource, resources_from_environment

PIPELINE_JOB = "cir_pipeline"      # per dataset partition: raw data -> triplets -> annotations
TRAINING_JOB = "training"          # per training dataset: base model -> its CIR-CoT model
EVALUATION_JOB = "evaluate_and_promote"  # per dataset partition: evaluation -> gate -> promoted model
FEEDBACK_JOB = "feedback"          # per dataset partition: feedback triplets (checked) and the online metrics
DELIVERY_JOB = "deliver"           # per dataset partition: the production model's Bento built and delivered again


def build_definitions(*, project_dir: str | None = None, artifacts_root: str | None = None,
                      dataset_roots: dict[str, str] | None = None, dvc_remote: str | None = None,
                      dvc_push: bool = True, annotator: AnnotatorResource | None = None,
                      training: TrainingResource | None = None, gate: GateResource | None = None) -> dg.Definitions:
    """Definitions wired to the given locations; unset ones come from the environment."""
    resources = resources_from_environment(
        project_dir=project_dir, artifacts_root=artifacts_root, dataset_roots=dataset_roots, dvc_remote=dvc_remote,
        dvc_push=dvc_push, annotator=annotator, training=training, gate=gate)
    data_modules = [raw_dataset_module, triplets_module, cot_annotations_module]
    data_assets = dg.load_assets_from_modules(data_modules)
    model_assets = [training_module.base_model, training_module.cir_cot_model]
    from assets.common import push_artifacts

    pipeline = dg.define_asset_job(PIPELINE_JOB, selection=dg.AssetSelection.assets(*data_assets),
                                   hooks={push_artifacts},
                                   partitions_def=dataset_partitions,
                                   description="Raw data, normalised triplets and CoT annotations of one dataset")
    training_job = dg.define_asset_job(TRAINING_JOB, selection=dg.AssetSelection.assets(*model_assets),
                                       hooks={push_artifacts}, partitions_def=training_partitions,
                                       description="Register the base model, then train the CIR-CoT model of one "
                                                   "training dataset on its train split and checked chains")
    eval_assets = [evaluation_module.evaluation, evaluation_module.promoted_model, gallery_index_module.gallery_index,
                   bento_module.bento, deployment_module.deployment]
    evaluation_job = dg.define_asset_job(
        EVALUATION_JOB,
        selection=dg.AssetSelection.assets(*eval_assets), hooks={push_artifacts},
        partitions_def=dataset_partitions,
        description="Evaluate the latest model trained for one dataset (zero-shot from the configured source where "
                    "it has no train split); the gate decides its promotion; the production model embeds the gallery "
                    "index; its Bento is built and delivered (exported, Kubernetes manifests, applied where "
                    "configured)",
    )
    delivery_job = dg.define_asset_job(
        DELIVERY_JOB, selection=dg.AssetSelection.assets(bento_module.bento, deployment_module.deployment),
        hooks={push_artifacts}, partitions_def=dataset_partitions,
        description="The production model's Bento built and delivered (exported, Kubernetes manifests, applied "
                    "where configured) without evaluating: after `circot rollback`, or to deliver again")
    feedback_assets = [feedback_module.feedback_triplets, feedback_module.online_metrics]
    feedback_job = dg.define_asset_job(
        FEEDBACK_JOB, selection=dg.AssetSelection.assets(*feedback_assets), hooks={push_artifacts},
        partitions_def=dataset_partitions,
        description="People's answers as checked, versioned training triplets; the online figures per model version")
    from orchestration.operations import build_automation

    schedules, sensors = build_automation(pipeline, training_job, evaluation_job, feedback_job=feedback_job)
    from orchestration.run_log import LOGGERS

    return dg.Definitions(
        loggers=LOGGERS,
        assets=[*data_assets, *model_assets, *eval_assets, *feedback_assets],
        schedules=schedules,
        sensors=sensors,
        asset_checks=[*dg.load_asset_checks_from_modules(data_modules), evaluation_module.promotion_gate,
                      gallery_index_module.index_recall, feedback_module.feedback_suite],
        jobs=[pipeline, training_job, evaluation_job, feedback_job, delivery_job],
        resources=resources,
    )


defs = build_definitions()
