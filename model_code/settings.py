"""Every setting a deployment gives through the environment, typed and checked (pydantic-settings).

:class:`PipelineSettings` is what the Dagster code location reads (``assets.resources`` builds the
resources from it); :class:`ServiceSettings` is what the BentoML service reads. Each field is the
variable ``CIRCOT_<FIELD NAME>``; its description is the one line ``docs/configuration.md`` shows
(that page is generated from these classes: ``python -m model_code.settings > docs/configuration.md``,
and a test fails when the two differ).

:func:`load` never raises: it returns the settings, with the default in place of each unusable value,
and one message per unusable value naming the variable, its value and what is expected, so that a
run can refuse to start with all of them while the Dagster UI still loads.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Literal, TypeVar

from pydantic import Field, ValidationError, create_model, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model_code.benchmarks import BENCHMARKS, PREFIX, UnknownBenchmarkError, model_source, training_names

DEFAULT_CRON = "0 3 * * 1"


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_unset(cls, value, info):
        """An empty optional variable means unset; an empty required one is an error (below)."""
        field = cls.model_fields[info.field_name]
        if isinstance(value, str) and not value.strip():
            if not field.is_required() and field.default is None:
                return None
            raise ValueError("is set but empty: unset it for the default, or give a value")
        return value.strip() if isinstance(value, str) else value


def _builtin_floors() -> str:
    return "; ".join(f"{spec.name}: " + ", ".join(f"{m} {v:.2f}" for m, v in spec.gate_floors.items())
                     for spec in BENCHMARKS.values() if spec.gate_floors) or "none"


class _PipelineFields(_Settings):
    """The pipeline's settings but the benchmarks' roots (:class:`PipelineSettings` adds one per
    configured benchmark, from its spec)."""

    project_dir: str | None = Field(None, description="the DVC project (dvc.yaml, params.yaml); unset: the current "
                                                      "directory")
    dvc_remote: str | None = Field(None, description="the DVC remote data is pushed to and pulled from; unset: the "
                                                     "project's default remote")
    artifacts: str = Field("artifacts", description="the artifacts root: a folder, or an object-store URI "
                                                    "(s3://bucket/circot, gs://..., any fsspec URL)")
    artifacts_cache: str | None = Field(None, description="the local copy of an object-store artifacts root; unset: "
                                                          "~/.cache/circot/artifacts/<hash of the root>")
    teacher: Literal["auto", "oracle", "local", "remote", "file"] = Field(
        "auto", description="the annotator: auto (the dataset's oracle when it has one, else the chains file, local "
                            "or remote as configured), oracle, local, remote or file (chains written elsewhere)")
    teacher_chains: str | None = Field(None, description="a JSON Lines file of chains (query id → chain) the file "
                                                         "teacher reads; `{dataset}` in the path is replaced by the "
                                                         "dataset's name")
    teacher_model_path: str | None = Field(None, description="a local Qwen2-VL-family teacher checkpoint folder")
    teacher_url: str | None = Field(None, description="an OpenAI-compatible teacher endpoint (e.g. vLLM's "
                                                      "http://host:8000/v1)")
    teacher_model: str | None = Field(None, description="the model name at that endpoint")
    teacher_api_key_env: str = Field("OPENAI_API_KEY", description="the variable that holds the endpoint's API key")
    profile: str = Field("embedded", description="the training profile: embedded (CPU, the shipped base, the "
                                                 "synthetic benchmark), gpu (a local Qwen2-VL-2B-class checkpoint, "
                                                 "LoRA), micro (LoRA on a micro checkpoint on a CPU) or smoke")
    base_model_path: str | None = Field(None, description="a local Qwen2-VL-family checkpoint folder as the base "
                                                          "model (profiles gpu, micro, smoke); nothing is "
                                                          "downloaded")
    lora_rank: int | None = Field(None, ge=1, description="the LoRA rank (alpha follows at twice the rank); unset: "
                                                         "the profile's (gpu: 64)")
    learning_rate: float | None = Field(None, gt=0, allow_inf_nan=False,
                                        description="the learning rate of both stages; unset: the profile's "
                                                    "(gpu: 2e-5)")
    batch_size: int | None = Field(None, ge=1, description="queries per step and process in both stages; unset: "
                                                           "the profile's (gpu: 64 align, 16 x 2 accumulated cot)")
    max_pixels: int | None = Field(None, ge=3136, description="the most pixels of an image the model sees (aspect "
                                                              "kept); unset: the profile's (gpu: 448 x 448 = 200704)")
    max_chain_tokens: int | None = Field(None, ge=8, description="chains longer than this many tokens are left out "
                                                                 "of the CoT stage (counted in the model's record); "
                                                                 "unset: the profile's (gpu: 256)")
    gradient_checkpointing: bool | None = Field(None, description="recompute activations in the backward pass (less "
                                                                  "memory, slower) in both stages; unset: the "
                                                                  "profile's (gpu: the align stage)")
    training_overrides: str | None = Field(None, description="any other value of the profile, comma-separated "
                                                             "[align.|cot.|base.]FIELD=VALUE (e.g. "
                                                             "'cot.steps=500,align.steps=200,lora_alpha=64')")
    training_launcher: Literal["in_process", "subprocess", "kubernetes"] = Field(
        "in_process", description="where cir_cot_model trains: in the run's process, in local processes "
                                  "(torchrun through Dagster Pipes), or in a Kubernetes pod (Pipes)")
    training_processes: int = Field(1, ge=1, description="processes (GPUs) of a subprocess launch")
    k8s_image: str | None = Field(None, description="the training pod's image (launcher kubernetes)")
    k8s_namespace: str = Field("default", description="the training pod's namespace")
    k8s_gpus: int = Field(1, ge=0, description="GPUs of the training pod")
    k8s_artifacts_pvc: str | None = Field(None, description="a volume claim holding the artifacts root, mounted in "
                                                            "the training pod")
    deploy: Literal["none", "kubernetes"] = Field(
        "none", description="where deployment[d] delivers the production model's Bento: none (the export and the "
                            "Kubernetes manifests are written to the artifacts store, nothing is applied) or "
                            "kubernetes (the manifests are applied through the Kubernetes API and the rollout "
                            "awaited; docs/deployment.md)")
    kube_context: str | None = Field(None, description="the kubeconfig context deployment[d] applies to; unset: the "
                                                       "current context (in a pod: the pod's service account)")
    deploy_namespace: str = Field("circot", description="the Kubernetes namespace of the service")
    deploy_image: str = Field("circot", description="the image repository of the service: the manifests name "
                                                    "<repository>:<Bento version> (bentoml containerize circot:<Bento "
                                                    "version> builds it as circot:<Bento version>)")
    deploy_replicas: int = Field(2, ge=1, description="pods of the service")
    deploy_gpus: int = Field(0, ge=0, description="GPUs per pod (nvidia.com/gpu; 0: CPU pods)")
    deploy_cpu: str = Field("2", pattern=r"^\d+(\.\d+)?m?$", description="CPU requested per pod (Kubernetes "
                                                                         "quantity: 2, 500m)")
    deploy_memory: str = Field("8Gi", pattern=r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$",
                               description="memory per pod, requested and limit (Kubernetes quantity: 8Gi)")
    deploy_token_secret: str = Field("circot-api-token", description="the Secret (key: token) holding the API token "
                                                                     "the pods read as CIRCOT_API_TOKEN")
    deploy_timeout_s: float = Field(900.0, gt=0, allow_inf_nan=False,
                                    description="how long deployment[d] waits for the rollout to be ready (seconds)")
    kube_version: str = Field("1.31", pattern=r"^\d+\.\d+$", description="the Kubernetes version whose OpenAPI "
                                                                           "schema the manifests are checked against")
    retrain_cron: str = Field(DEFAULT_CRON, description="the retraining schedule (cron, five fields; the schedule "
                                                        "starts stopped)")
    alert_webhook: str | None = Field(None, description="a URL a failed run's alert is posted to (JSON); unset: the "
                                                        "alert is logged")
    dagster_url: str = Field("http://127.0.0.1:3000", description="the Dagster UI's address, for links in alerts")
    gate_floors: str | None = Field(None, description="the gate's floors, JSON {metric: floor} (every dataset) "
                                                      "and/or {dataset: {metric: floor}}, merged over the built-in "
                                                      f"floors ({_builtin_floors()})")
    gate_cot_not_worse: bool = Field(True, description="the gate requires CoT not worse than no-CoT (1/0, "
                                                       "true/false, yes/no, on/off)")
    gate_cot_tolerance: float = Field(0.0, ge=0, allow_inf_nan=False,
                                      description="how far CoT may trail no-CoT on the headline (absolute)")
    gate_cot_confidence: float = Field(0.95, ge=0, le=0.9999, allow_inf_nan=False,
                                       description="the paired test fails CoT only when it is worse at this "
                                                   "confidence (0: compare the means)")
    gate_max_regression: float = Field(0.01, ge=0, allow_inf_nan=False,
                                       description="how far the headline may fall below the production model's")
    index_uri: str | None = Field(None, description="the LanceDB URI of the gallery indexes; unset: "
                                                    "<artifacts>/lancedb")
    gallery_extra_splits: str | None = Field(None, description="splits the served gallery index adds to the "
                                                               "evaluated ones, comma-separated (e.g. train: what "
                                                               "feedback can train on, docs/feedback.md); unset: none")
    feedback_cap_per_token: int = Field(100, ge=1, description="the most feedback triplets one bearer token "
                                                               "contributes to a dataset (docs/feedback.md)")
    feedback_retrain_after: int = Field(50, ge=1, description="feedback_sensor builds a new feedback set once "
                                                              "this many new feedback triplets are accepted")
    feedback_weight: float = Field(1.0, ge=0, allow_inf_nan=False,
                                   description="how many times a feedback triplet counts in training (0: "
                                               "feedback is collected but not trained on)")

    zero_shot_source: str = Field("cirr", description="the training benchmark whose model evaluates, "
                                  "zero-shot, each benchmark without a train split (CIRCO)")

    @field_validator("zero_shot_source")
    @classmethod
    def _source(cls, value: str) -> str:
        try:
            for spec in BENCHMARKS.values():
                model_source(spec, value)
        except UnknownBenchmarkError:
            raise ValueError(f"is not a benchmark with a train split ({', '.join(training_names())})") from None
        return value

    @field_validator("training_overrides")
    @classmethod
    def _overrides(cls, value: str | None) -> str | None:
        if value is not None and not all(re.fullmatch(r"((align|cot|base)\.)?[a-z_]+=[^,=]+", item.strip())
                                         for item in value.split(",")):
            raise ValueError("is not a comma-separated list of [align.|cot.|base.]FIELD=VALUE")
        return value

    def profile_overrides(self) -> list[str]:
        """``training_overrides`` as a list (empty when unset)."""
        return [item.strip() for item in (self.training_overrides or "").split(",") if item.strip()]

    @field_validator("retrain_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from dagster._utils.schedules import is_valid_cron_string

        if not is_valid_cron_string(value):
            raise ValueError("is not a cron expression (five fields, e.g. '0 3 * * 1')")
        return value

    @field_validator("gate_floors")
    @classmethod
    def _floors(cls, value: str | None) -> str | None:
        if value is not None:
            parse_floors(value)  # a ValueError says what is wrong
        return value

    @field_validator("gallery_extra_splits")
    @classmethod
    def _splits(cls, value: str | None) -> str | None:

        if value is not None and not all(re.fullmatch(r"[A-Za-z0-9_-]+", s.strip()) for s in value.split(",")):
            raise ValueError("is not a comma-separated list of split names (e.g. 'train')")
        return value

    def extra_gallery_splits(self) -> list[str]:
        """``gallery_extra_splits`` as a list (empty when unset)."""
        return [s.strip() for s in (self.gallery_extra_splits or "").split(",") if s.strip()]

    def dataset_roots(self) -> dict[str, str]:
        """``{dataset: root}`` of the real benchmarks that have one configured."""
        return {name: getattr(self, spec.root_setting) for name, spec in BENCHMARKS.items()
                if spec.configured and getattr(self, spec.root_setting)}


# one root per benchmark whose files a user brings (CIRCOT_<NAME>_ROOT), from its spec
PipelineSettings = create_model(
    "PipelineSettings", __base__=_PipelineFields, __module__=__name__,
    __doc__="What the Dagster code location reads: every setting of the pipeline, the benchmarks' roots included.",
    **{spec.root_setting: (str | None, Field(None, description=f"{spec.title}'s folder ({spec.root_layout}); "
                                                               "unset: its partition fails and says how to set it"))
       for spec in BENCHMARKS.values() if spec.configured})
ROOT_FIELDS = frozenset(spec.root_setting for spec in BENCHMARKS.values() if spec.configured)


class ServiceSettings(_Settings):
    serve_dataset: str = Field("synthetic", description="the dataset whose production model and gallery index the "
                                                        "service serves")
    model_tag: str | None = Field(None, description="the model store tag served (cir-cot:<version>); unset: the "
                                                    "production model of CIRCOT_SERVE_DATASET (in a Bento's image: "
                                                    "the model the Bento holds)")
    api_token: str | None = Field(None, description="when set, every call but the page and the health endpoints "
                                                    "needs Authorization: Bearer <token>")
    metrics_open: bool = Field(False, description="/metrics answers without the token (for a scraper inside the "
                                                  "cluster; 0: it needs the token like the API)")
    log_json: bool = Field(False, description="log JSON lines (one object per line) instead of text")
    max_image_bytes: int = Field(20 * 2**20, ge=1, description="the largest image upload, in bytes")
    max_image_pixels: int = Field(25_000_000, ge=1, description="the largest image, in pixels (width x height), "
                                                                "checked before the image is decoded")
    max_images: int = Field(64, ge=1, description="the most images one /embed_image may carry")
    max_k: int = Field(100, ge=1, description="the most results one /search may ask for")
    encoder_timeout_s: float = Field(60.0, ge=0.1, allow_inf_nan=False,
                                     description="the longest a call to a model process (the encoder or the "
                                                 "reasoner) may take (seconds); then 503")
    liveness_grace_s: float = Field(60.0, ge=0, allow_inf_nan=False,
                                    description="/livez fails (503) once the encoder or the reasoner has not answered "
                                                "at all for this long (seconds): dead or stuck, so that an "
                                                "orchestrator's liveness probe restarts the service (BentoML in a "
                                                "container does not restart a dead model process)")
    liveness_startup_s: float = Field(600.0, ge=0, allow_inf_nan=False,
                                      description="how long /livez waits for the encoder's and the reasoner's "
                                                  "first answer after the service starts (seconds) before it "
                                                  "fails: their processes import the stack and start first")
    cot_queue: int = Field(16, ge=1, description="the most CoT /search calls a front worker holds at once (answered "
                                                 "or waiting for the reasoner); one more gets 503 with Retry-After")
    embedding_queue: int = Field(64, ge=1, description="the most embedding calls (no-CoT /search, /embed_image) a "
                                                       "front worker holds at once (answered or waiting for the "
                                                       "encoder); one more gets 503 with Retry-After")
    encoder_threads: int = Field(1, ge=1, description="torch threads of the encoder process (no-CoT queries and "
                                                      "gallery images)")
    reasoner_threads: int = Field(1, ge=1, description="torch threads of the reasoner process (CoT decoding)")
    serve_gpu: bool = Field(False, description="the encoder and the reasoner declare a GPU (half of one each, which "
                                               "BentoML assigns) and load the model on it; read by `bentoml build` "
                                               "too, so the Bento declares it (docs/deployment.md)")
    shutdown_grace_s: float = Field(3.0, ge=0, allow_inf_nan=False,
                                    description="after SIGTERM, how long calls in flight may finish (seconds) before "
                                                "they are answered 503 and the process exits")
    adaptive_batching: bool = Field(True, description="the encoder and the reasoner batch concurrent requests (0: "
                                                      "off, the load test's baseline)")
    artifacts: str = Field("artifacts", description="the artifacts root (where the gallery index lives unless "
                                                    "CIRCOT_INDEX_URI says otherwise)")
    index_uri: str | None = Field(None, description="the LanceDB URI of the gallery indexes")
    feedback_ttl_hours: float = Field(168.0, gt=0, allow_inf_nan=False,
                                      description="feedback on a query is taken this long after the answer "
                                                  "(hours; later: 410)")

    @field_validator("serve_dataset")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in BENCHMARKS:
            raise ValueError(f"is not a benchmark ({', '.join(BENCHMARKS)})")
        return value


def parse_floors(text: str) -> dict:
    """``CIRCOT_GATE_FLOORS``: JSON ``{metric: floor}`` (every dataset) and/or ``{dataset: {metric:
    floor}}``, each floor a finite number from 0 to 1. Returns ``{"": global floors, dataset: floors}``;
    a ValueError says what is wrong."""
    try:
        given = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"is not valid JSON ({e})") from None
    if not isinstance(given, dict):
        raise ValueError("must be a JSON object: {metric: floor} or {dataset: {metric: floor}}")

    def floor(where: str, metric: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0 <= value <= 1:
            raise ValueError(f"{where}{metric!r}: {value!r} is not a number from 0 to 1")
        return float(value)

    out: dict[str, dict[str, float]] = {"": {}}
    for key, value in given.items():
        if isinstance(value, dict):
            out[key] = {m: floor(f"{key}.", m, v) for m, v in value.items()}
        else:
            out[""][key] = floor("", key, value)
    return out


S = TypeVar("S", bound=_Settings)


BOOLEAN_WORDS = "1, true, yes, on, 0, false, no, off"


def _bounds(cls: type[_Settings], field: str) -> tuple[float | None, float | None]:
    low = high = None
    for m in cls.model_fields[field].metadata:
        low = getattr(m, "ge", low)
        high = getattr(m, "le", high)
    return low, high


def _reason(cls: type[_Settings], field: str, error: dict) -> str:
    """What an error means, in the words of the configuration reference."""
    kind = error["type"]
    low, high = _bounds(cls, field) if field in cls.model_fields else (None, None)
    if kind in ("int_parsing", "int_from_float", "int_type") or (
            kind == "greater_than_equal" and cls.model_fields[field].annotation is int):
        return "is not a whole number" + (f" of at least {low}" if low is not None else "")
    if kind in ("finite_number", "greater_than_equal", "less_than_equal"):
        return f"is out of range (a number from {low}" + (f" to {high})" if high is not None else ")")
    if kind == "float_parsing":
        return "is not a number"
    if kind == "bool_parsing":
        return f"is not one of {BOOLEAN_WORDS}"
    if kind == "literal_error":
        return f"is not one of {error['ctx']['expected']}"
    return error["msg"].removeprefix("Value error, ")


def _messages(cls: type[_Settings], error: ValidationError) -> tuple[list[str], set[str]]:

    messages, fields = [], set()
    for e in error.errors():
        field = str(e["loc"][0]) if e["loc"] else ""
        fields.add(field)
        name = PREFIX + field.upper()
        messages.append(f"{name}={os.environ.get(name, '')!r} {_reason(cls, field, e)}")
    return messages, fields


def load(cls: type[S]) -> tuple[S, list[str]]:
    """``(settings, errors)`` from the environment: each unusable variable is one message, and its
    default is used in its place."""
    try:
        return cls(), []
    except ValidationError as e:
        messages, fields = _messages(cls, e)
    return cls(**{f: cls.model_fields[f].default for f in fields if f in cls.model_fields}), messages


def environment_errors() -> list[str]:
    """Every unusable setting of the pipeline in the environment (checked before a run starts)."""
    return load(PipelineSettings)[1]


def reference() -> str:
    """docs/configuration.md: every variable with its default and meaning, from the classes above."""
    lines = ["# Configuration", "",
             "Every setting is an environment variable. This page is generated from `model_code/settings.py`",
             "(`python -m model_code.settings > docs/configuration.md`); a test fails when it is out of date.",
             "An unusable value (a word where a number goes, a value out of range, an empty variable) stops a",
             "run before it starts, with one line per variable naming its value and what is expected.", ""]
    for title, cls in (("The pipeline (Dagster)", PipelineSettings), ("The service (BentoML)", ServiceSettings)):
        lines += [f"## {title}", "", "| variable | default | meaning |", "|---|---|---|"]
        for name, field in cls.model_fields.items():
            if name in ROOT_FIELDS:
                continue
            default = field.default
            shown = "unset" if default is None else f"`{default if isinstance(default, str) else json.dumps(default)}`"
            lines.append(f"| `{PREFIX}{name.upper()}` | {shown} | {field.description} |")
        if cls is PipelineSettings:
            lines.append(f"| `{PREFIX}<BENCHMARK>_ROOT` | unset | the folder of a benchmark whose files you bring, "
                         "one variable per benchmark (e.g. `CIRCOT_CIRR_ROOT`); `circot benchmarks` lists each "
                         "with what its folder holds; unset: its partition fails and says how to set it |")
        lines.append("")
    lines += ["## Set by the Makefile", "",
              "| variable | value | why |", "|---|---|---|",
              "| `DAGSTER_HOME` | `./.dagster` | the Dagster instance (runs, schedules) of this checkout |",
              "| `BENTOML_HOME` | `./.bentoml` | the BentoML store: promoted models and Bentos |",
              "| `HF_HUB_OFFLINE` | `1` | nothing is downloaded from the Hugging Face hub: a base or teacher "
              "model is a local folder, never a hub id |",
              "| `GX_ANALYTICS_ENABLED` | `false` | Great Expectations sends no usage data |",
              "| `DVC_NO_ANALYTICS` | `1` | DVC sends no usage data |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference(), end="")
