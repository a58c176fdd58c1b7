"""The Dagster code location: ``dagster dev`` (``[tool.dagster]`` in pyproject.toml) loads ``defs``.

Resources are configured here from the environment, with defaults that run the embedded profile:

====================== ===================================== ==============================
variable               meaning                               default
====================== ===================================== ==============================
CIRCOT_PROJECT_DIR     DVC project (dvc.yaml, params.yaml)   current directory
CIRCOT_DVC_REMOTE      DVC remote to push to / pull from     the project's default remote
CIRCOT_ARTIFACTS       artifacts root                        ``artifacts``
CIRCOT_FASHIONIQ_ROOT  FashionIQ root (official layout)      unset: partition fails, says how
CIRCOT_CIRR_ROOT       CIRR root                             unset
CIRCOT_CIRCO_ROOT      CIRCO root                            unset
CIRCOT_TEACHER         annotator: auto|oracle|local|remote   auto (oracle for synthetic)
CIRCOT_TEACHER_MODEL_PATH  local Qwen2-VL-family teacher      unset
CIRCOT_TEACHER_URL     OpenAI-compatible endpoint (…/v1)     unset
CIRCOT_TEACHER_MODEL   model name at that endpoint           unset
CIRCOT_TEACHER_API_KEY_ENV  variable holding the API key     OPENAI_API_KEY
CIRCOT_PROFILE         training profile: embedded | gpu      embedded
CIRCOT_BASE_MODEL_PATH local Qwen2-VL-family checkpoint      unset (embedded: the tiny base)
CIRCOT_GATE_FLOORS     gate floors, JSON {metric: floor} or   built-in synthetic floors
                       {dataset: {metric: floor}}
CIRCOT_GATE_COT_NOT_WORSE  require cot >= no_cot (1/0)       1
CIRCOT_GATE_COT_TOLERANCE  how far cot may trail no_cot      0.0
CIRCOT_GATE_COT_CONFIDENCE paired test: fail when cot is     0.95 (0: compare means)
                       worse at this confidence
CIRCOT_GATE_MAX_REGRESSION headline drop vs production       0.01
BENTOML_HOME           BentoML store (promoted models)        ~/bentoml (make: ./.bentoml)
====================== ===================================== ==============================
"""

from __future__ import annotations

import os

import dagster as dg

from assets import cot_annotations as cot_annotations_module
from assets import evaluation as evaluation_module
from assets import raw_dataset as raw_dataset_module
from assets import training as training_module
from assets import triplets as triplets_module
from assets.common import dataset_partitions
from assets.resources import (AnnotatorResource, ArtifactStore, DatasetRoots, DvcResource, GateResource,
                              TrainingResource)

PIPELINE_JOB = "cir_pipeline"      # per dataset partition: raw data -> triplets -> annotations
TRAINING_JOB = "training"          # base model -> CIR-CoT model (on the training partitions' annotations)
EVALUATION_JOB = "evaluate_and_promote"  # per dataset partition: evaluation -> gate -> promoted model


def build_definitions(*, project_dir: str | None = None, artifacts_root: str | None = None,
                      dataset_roots: dict[str, str] | None = None, dvc_remote: str | None = None,
                      dvc_push: bool = True, annotator: AnnotatorResource | None = None,
                      training: TrainingResource | None = None, gate: GateResource | None = None) -> dg.Definitions:
    """Definitions wired to the given locations; unset ones come from the environment."""
    env = os.environ
    roots = dataset_roots if dataset_roots is not None else {
        d: env.get(f"CIRCOT_{d.upper()}_ROOT") for d in ("fashioniq", "cirr", "circo")}
    resources = {
        "datasets": DatasetRoots(**{k: v for k, v in roots.items() if v}),
        "dvc": DvcResource(project_dir=project_dir or env.get("CIRCOT_PROJECT_DIR", os.getcwd()),
                           remote=dvc_remote or env.get("CIRCOT_DVC_REMOTE"), push=dvc_push),
        "artifacts": ArtifactStore(root=artifacts_root or env.get("CIRCOT_ARTIFACTS", "artifacts")),
        "annotator": annotator or AnnotatorResource(
            kind=env.get("CIRCOT_TEACHER", "auto"), local_model_path=env.get("CIRCOT_TEACHER_MODEL_PATH"),
            remote_base_url=env.get("CIRCOT_TEACHER_URL"), remote_model=env.get("CIRCOT_TEACHER_MODEL"),
            api_key_env=env.get("CIRCOT_TEACHER_API_KEY_ENV", "OPENAI_API_KEY")),
        "training": training or TrainingResource(profile=env.get("CIRCOT_PROFILE", "embedded"),
                                                 base_model_path=env.get("CIRCOT_BASE_MODEL_PATH")),
        "gate": gate or GateResource(
            floors=env.get("CIRCOT_GATE_FLOORS") or None,
            cot_not_worse=env.get("CIRCOT_GATE_COT_NOT_WORSE", "1").lower() not in ("0", "false", "no"),
            cot_tolerance=float(env.get("CIRCOT_GATE_COT_TOLERANCE", "0")),
            cot_confidence=float(env.get("CIRCOT_GATE_COT_CONFIDENCE", "0.95")),
            max_regression=float(env.get("CIRCOT_GATE_MAX_REGRESSION", "0.01"))),
    }
    data_modules = [raw_dataset_module, triplets_module, cot_annotations_module]
    data_assets = dg.load_assets_from_modules(data_modules)
    model_assets = [training_module.base_model, training_module.cir_cot_model]
    pipeline = dg.define_asset_job(PIPELINE_JOB, selection=dg.AssetSelection.assets(*data_assets),
                                   partitions_def=dataset_partitions,
                                   description="Raw data, normalised triplets and CoT annotations of one dataset")
    training_job = dg.define_asset_job(TRAINING_JOB, selection=dg.AssetSelection.assets(*model_assets),
                                       description="Bootstrap or register the base model, then train the CIR-CoT model")
    eval_assets = [evaluation_module.evaluation, evaluation_module.promoted_model]
    evaluation_job = dg.define_asset_job(EVALUATION_JOB, selection=dg.AssetSelection.assets(*eval_assets),
                                         partitions_def=dataset_partitions,
                                         description="Evaluate the latest model on one dataset; the gate decides its promotion")
    return dg.Definitions(
        assets=[*data_assets, *model_assets, *eval_assets],
        asset_checks=[*dg.load_asset_checks_from_modules(data_modules), evaluation_module.promotion_gate],
        jobs=[pipeline, training_job, evaluation_job],
        resources=resources,
    )


defs = build_definitions()
