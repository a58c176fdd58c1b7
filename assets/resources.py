"""Resources the assets use: where datasets live, the DVC project, and the artifacts root.

Each is configured in one place (``orchestration/definitions.py``) from environment variables
with defaults that run the embedded profile.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import dagster as dg
from fsspec.core import url_to_fs

from model_code.annotation import teachers
from model_code.annotation.chains_file import ChainsFileError, FileTeacher
from model_code.benchmarks import benchmark
from model_code.data.versioning import DvcProject
from model_code.evaluation.gate import GateConfig, gate_floors
from model_code.index import GalleryIndex, index_uri
from model_code.settings import PipelineSettings, load


class DatasetRoots(dg.ConfigurableResource):
    """Local roots of the benchmarks whose files a user brings, ``{dataset: folder}``
    (``CIRCOT_<NAME>_ROOT``). A generated benchmark (synthetic) needs none: DVC makes it."""

    roots: dict[str, str] = {}

    def root(self, dataset: str, *, must_exist: bool = True) -> Path:
        value = self.roots.get(dataset)
        spec = benchmark(dataset)
        if not value:
            raise dg.Failure(
                description=(
                    f"Dataset partition '{dataset}' has no data root configured. Put the benchmark's "
                    f"official files in a folder ({spec.root_layout}) and either set "
                    f"{spec.root_env}=/path/to/it before starting Dagster, or configure the "
                    f"'datasets' resource's roots: {{'{dataset}': ...}}. To version it with DVC, run "
                    f"`dvc add <folder>` inside the project and point the root at that folder."))
        path = Path(value).expanduser()
        if must_exist and not path.is_dir():
            raise dg.Failure(description=f"Dataset root for '{dataset}' does not exist: {path}")
        return path


class DvcResource(dg.ConfigurableResource):
    """The DVC project that versions raw data (``dvc.yaml``, ``params.yaml``, a remote)."""

    project_dir: str = "."
    remote: str | None = None  # None: the project's default remote (a local folder out of the box)
    push: bool = True  # push newly produced data to the remote after each materialisation

    def project(self, echo: Callable[[str], None] | None = None) -> DvcProject:
        return DvcProject(Path(self.project_dir), self.remote, echo)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


class ArtifactStore(dg.ConfigurableResource):
    """Where pipeline artifacts live (docs/architecture.md §7): ``<root>/<stage>/<dataset>/...``.

    ``root`` is a local folder (the default) or an object-store URI (``s3://bucket/circot``,
    ``gs://…``, any fsspec URL; ``memory://`` and ``file://`` in tests), shared by every machine
    that runs the pipeline. With a URI, the stages work in a local copy (``cache``: default
    ``~/.cache/circot/artifacts/<hash of the root>``; give it the same path on every pod, e.g. an
    emptyDir at ``/cache/circot``): each stage :meth:`pull` s the folders its inputs' records name
    and :meth:`push` es the folders it wrote, so a stage on another machine finds them."""

    root: str = "artifacts"
    cache: str | None = None
    # unusable settings in the environment (model_code.settings): every run refuses to start with them
    configuration_errors: list[str] = []

    def setup_for_execution(self, context) -> None:
        if self.configuration_errors:
            raise dg.Failure(description="The configuration cannot be used (docs/configuration.md):\n"
                                         + "\n".join(f"- {e}" for e in self.configuration_errors))

    @property
    def remote(self) -> bool:
        return "://" in self.root

    def local_root(self) -> Path:
        if not self.remote:
            return Path(self.root).expanduser().resolve()
        if self.cache:
            return Path(self.cache).expanduser().resolve()

        return Path.home() / ".cache" / "circot" / "artifacts" / hashlib.md5(self.root.encode()).hexdigest()[:12]

    def path(self, *parts: str) -> Path:
        """A file under the (local) root; its folder is created."""
        p = self.local_root().joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def dir(self, *parts: str) -> Path:
        """A folder under the (local) root, created."""
        p = self.local_root().joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def _remote_of(self, local: Path):
        """(filesystem, remote path) of a local path under the local root; None when there is no
        object store or the path is elsewhere (e.g. a user's checkpoint folder)."""
        if not self.remote:
            return None
        try:
            rel = Path(local).resolve().relative_to(self.local_root())
        except ValueError:
            return None

        fs, base = url_to_fs(self.root)
        return fs, f"{base.rstrip('/')}/{rel.as_posix()}" if rel.parts else base

    def sync_record_paths(self, record: dict, direction: str) -> None:
        """Pull (``"pull"``) or push (``"push"``) every file or folder a record names under the
        artifacts root (a no-op for a local root): how a stage on one machine sees what a stage on
        another wrote. A file inside a version folder brings its folder (its check results live there)."""
        if not self.remote:
            return
        root = self.local_root()
        sync = self.pull if direction == "pull" else self.push
        for value in _strings(record):
            path = Path(value)
            if not path.is_absolute():
                continue
            try:
                path.relative_to(root)
            except ValueError:
                continue
            sync(path)
            if path.suffix:   # a file in a version folder: that version's check results too
                sync(path.parent / "checks")

    def push(self, local: str | Path) -> int:
        """Upload a file or folder written under the local root to the object store (large files
        already there with the same size are skipped: weights and tables live in versioned folders
        and never change; small ones, e.g. a verdict, are always sent). Returns the files sent."""
        target = self._remote_of(Path(local))
        if target is None:
            return 0
        fs, remote = target
        local = Path(local)
        if not local.exists():
            return 0
        files = [local] if local.is_file() else sorted(f for f in local.rglob("*") if f.is_file())
        sent = 0
        for f in files:
            dest = remote if f == local else f"{remote}/{f.relative_to(local).as_posix()}"
            size = f.stat().st_size
            if size > 2**20 and fs.exists(dest) and fs.size(dest) == size:
                continue
            fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(f), dest)
            sent += 1
        return sent

    def pull(self, local: str | Path, *, only_missing: bool = False) -> Path:
        """Make a file or folder the object store holds present in the local copy (what another
        machine's stage wrote); a no-op for a local root or a path outside it. Returns ``local``.
        ``only_missing``: fetch only the files the local copy lacks (for folders whose files never
        change once written, e.g. the feedback store's events)."""
        local = Path(local)
        target = self._remote_of(local)
        if target is None:
            return local
        fs, remote = target
        if not fs.exists(remote):
            return local
        if fs.isfile(remote):
            items = [(remote, local)]
        else:
            items = [(f, local / Path(f[len(remote.rstrip("/")) + 1:])) for f in fs.find(remote)]
        for src, dest in items:
            if only_missing and dest.is_file():
                continue
            size = fs.size(src)
            if size > 2**20 and dest.is_file() and dest.stat().st_size == size:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            fs.get_file(src, str(tmp))
            tmp.replace(dest)
        return local


class AnnotatorResource(dg.ConfigurableResource):
    """Which annotator writes the chains of thought. ``auto``: the dataset's oracle when it has one
    (``synthetic``); else the file teacher when ``chains_file`` is set, the local teacher when
    ``local_model_path`` is set, else the remote one when ``remote_base_url`` is set."""

    kind: str = "auto"  # auto | oracle | file | local | remote
    chains_file: str | None = None  # JSON Lines of chains by query id (FileTeacher); "{dataset}": the dataset's name
    local_model_path: str | None = None
    device: str | None = None
    dtype: str = "auto"
    attn_implementation: str | None = None
    batch_size: int = 32  # on an H100, tokens/s grows almost linearly with the batch (bench/teacher_throughput.py)
    max_new_tokens: int = 384
    remote_base_url: str | None = None
    remote_model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 5

    def resolve_kind(self, dataset: str) -> str:
        if self.kind != "auto":
            return self.kind
        if benchmark(dataset).hooks.annotator is not None:
            return "oracle"
        if self.chains_file:
            return "file"
        if self.local_model_path:
            return "local"
        if self.remote_base_url:
            return "remote"
        raise dg.Failure(description=(
            f"Dataset '{dataset}' needs a teacher model to annotate it: set CIRCOT_TEACHER_MODEL_PATH to a "
            f"local Qwen2-VL-family checkpoint folder, or CIRCOT_TEACHER_URL (an OpenAI-compatible endpoint, "
            f"e.g. vLLM's http://host:8000/v1) with CIRCOT_TEACHER_MODEL and the API key in $OPENAI_API_KEY "
            f"(or the variable named by CIRCOT_TEACHER_API_KEY_ENV), or CIRCOT_TEACHER_CHAINS to a JSON Lines file "
            f"of chains written elsewhere (docs/data.md)."))

    def chains_path(self, dataset: str) -> Path:
        """The chains file of ``dataset``: ``chains_file`` with ``{dataset}`` replaced by its name."""
        if not self.chains_file:
            raise dg.Failure(description="annotator kind 'file' needs chains_file (CIRCOT_TEACHER_CHAINS): a JSON "
                                         "Lines file of chains by query id")
        return Path(self.chains_file.replace("{dataset}", dataset)).expanduser()

    def build(self, dataset: str, raw_root: str):

        kind = self.resolve_kind(dataset)
        if kind == "oracle":
            oracle = benchmark(dataset).hooks.annotator
            if oracle is None:
                raise dg.Failure(description=f"Dataset '{dataset}' has no oracle annotator (only a benchmark whose "
                                             f"ground truth describes its images has one, e.g. synthetic).")
            return oracle(raw_root)
        if kind == "file":
            path = self.chains_path(dataset)
            if not path.is_file():
                raise dg.Failure(description=(
                    f"the chains file of dataset '{dataset}' does not exist: {path} (CIRCOT_TEACHER_CHAINS="
                    f"{self.chains_file}); write it (e.g. `circot chains-from-text`) or point the setting at it"))
            try:
                return FileTeacher(path)
            except ChainsFileError as e:
                raise dg.Failure(description=f"the chains file of dataset '{dataset}' cannot be used "
                                             f"(CIRCOT_TEACHER_CHAINS): {e}") from None
        if kind == "local":
            if not self.local_model_path:
                raise dg.Failure(
                    description="annotator kind 'local' needs local_model_path (CIRCOT_TEACHER_MODEL_PATH)"
                )
            return teachers.LocalTeacher(self.local_model_path, device=self.device, dtype=self.dtype,
                                           attn_implementation=self.attn_implementation, batch_size=self.batch_size,
                                           max_new_tokens=self.max_new_tokens)
        if kind == "remote":
            if not (self.remote_base_url and self.remote_model):
                raise dg.Failure(description="annotator kind 'remote' needs remote_base_url and remote_model "
                                             "(CIRCOT_TEACHER_URL, CIRCOT_TEACHER_MODEL)")
            return teachers.RemoteTeacher(self.remote_base_url, self.remote_model, api_key_env=self.api_key_env,
                                            max_concurrency=self.max_concurrency, timeout_s=self.timeout_s,
                                            max_retries=self.max_retries, max_tokens=self.max_new_tokens)
        raise dg.Failure(description=f"unknown annotator kind {self.kind!r}: use auto, oracle, file, local or "
                                     f"remote")


class TrainingResource(dg.ConfigurableResource):
    """Which training profile runs (``embedded``: CPU and the shipped base; ``gpu``: a Qwen2-VL-2B-class
    checkpoint in bf16, LoRA; ``micro``: LoRA on a micro checkpoint on a CPU; ``smoke``: the embedded recipe
    in a few steps), for a checkpoint base where it is, and the profile's values a deployment changes."""

    profile: str = "embedded"
    base_model_path: str | None = None  # a local Qwen2-VL-family checkpoint folder (profiles gpu, smoke)
    # where cir_cot_model trains: in the run's own process (the embedded default), in `processes`
    # local processes launched through Dagster Pipes (torchrun; GPUs when present), or in a Kubernetes
    # pod launched through dagster-k8s's Pipes client (image, namespace and GPUs below)
    launcher: str = "in_process"        # in_process | subprocess | kubernetes
    processes: int = 1
    k8s_image: str | None = None
    k8s_namespace: str = "default"
    k8s_gpus: int = 1
    k8s_cpu: str = "8"
    k8s_memory: str = "64Gi"
    k8s_artifacts_volume: str | None = None   # a PersistentVolumeClaim holding the artifacts root, mounted at it
    # the profile's values a deployment changes (unset: the profile's; model_code.settings describes each)
    lora_rank: int | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    max_pixels: int | None = None
    max_chain_tokens: int | None = None
    gradient_checkpointing: bool | None = None
    overrides: list[str] = []            # [align.|cot.|base.]FIELD=VALUE

    def pod_spec(self, command: list[str], artifacts_root: str, mount_path: str | None = None) -> dict:
        """The training pod's spec for dagster-k8s's ``PipesK8sClient`` (``base_pod_spec``): the
        artifacts root in its environment, the volume claim (if any) mounted at ``mount_path``
        (default the root itself: a local root shared through the claim)."""
        if not self.k8s_image:
            raise dg.Failure(description="launcher 'kubernetes' needs an image: set CIRCOT_K8S_IMAGE to the "
                                         "training image built from docker/train.Dockerfile (docs/training.md)")
        container = {
            "name": "train", "image": self.k8s_image, "command": command, "workingDir": "/app",
            "resources": {"limits": {"nvidia.com/gpu": str(self.k8s_gpus), "cpu": self.k8s_cpu,
                                     "memory": self.k8s_memory},
                          "requests": {"nvidia.com/gpu": str(self.k8s_gpus), "cpu": self.k8s_cpu,
                                       "memory": self.k8s_memory}},
            "env": [{"name": "CIRCOT_ARTIFACTS", "value": artifacts_root}, {"name": "HF_HUB_OFFLINE", "value": "1"}],
        }
        spec = {"restartPolicy": "Never", "containers": [container],
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
        if self.k8s_artifacts_volume:
            container["volumeMounts"] = [{"name": "artifacts", "mountPath": mount_path or artifacts_root}]
            spec["volumes"] = [{"name": "artifacts",
                                "persistentVolumeClaim": {"claimName": self.k8s_artifacts_volume}}]
        return spec

    def refusal(self, dataset: str) -> str | None:
        """Why this configuration cannot train on ``dataset``, or None: the profile itself unusable (what
        :meth:`spec` says), or a base that cannot read the dataset's texts
        (``model_code.model.recipes.training_refusal``)."""
        from model_code.model.recipes import training_refusal

        try:
            profile = self.spec()
        except dg.Failure as e:
            return e.description
        return training_refusal(profile, self.profile, benchmark(dataset))

    def spec(self):
        from model_code.model.recipes import PROFILES

        if self.profile not in PROFILES:
            raise dg.Failure(description=f"unknown training profile {self.profile!r}; known: {', '.join(PROFILES)}")
        profile = PROFILES[self.profile]
        if self.base_model_path:
            profile = profile.with_overrides(base={"kind": "checkpoint", "checkpoint_path": self.base_model_path})
        stages = {k: v for k, v in (("lr", self.learning_rate), ("batch_size", self.batch_size),
                                    ("gradient_checkpointing", self.gradient_checkpointing)) if v is not None}
        fields = {k: v for k, v in (("max_pixels", self.max_pixels), ("max_chain_tokens", self.max_chain_tokens))
                  if v is not None}
        if self.lora_rank is not None:
            fields.update(lora_r=self.lora_rank, lora_alpha=2 * self.lora_rank)
        try:
            profile = profile.with_overrides(align=stages, cot=stages, **fields).with_settings(self.overrides)
        except ValueError as e:
            raise dg.Failure(description=f"training profile {self.profile!r} with the configured values: {e} "
                                         "(CIRCOT_TRAINING_OVERRIDES, docs/configuration.md)") from None
        if profile.base.kind == "checkpoint" and not profile.base.checkpoint_path:
            raise dg.Failure(description=(
                f"Training profile '{self.profile}' trains a checkpoint given as its base: set CIRCOT_BASE_MODEL_PATH "
                f"to a local Qwen2-VL-family folder (e.g. Qwen2-VL-2B-Instruct with config.json and *.safetensors)."))
        return profile


class IndexResource(dg.ConfigurableResource):
    """Where the gallery indexes live (docs/architecture.md §7): a LanceDB URI, default ``<artifacts>/lancedb``;
    any LanceDB URI works (``s3://bucket/path``, ``gs://...``). ``exact_below``: galleries smaller
    than this are searched exactly in memory, larger ones through an ANN index."""

    uri: str | None = None
    exact_below: int = 50_000

    def open(self, dataset: str, artifacts: ArtifactStore):

        uri = index_uri(artifacts.root, self.uri, artifacts.local_root())
        return GalleryIndex(uri, dataset, exact_below=self.exact_below)


class GateResource(dg.ConfigurableResource):
    """The promotion gate's rules (model_code/gate.py). ``floors``: JSON, either ``{metric: floor}``
    for every dataset or ``{dataset: {metric: floor}}``; unset: the built-in floors of the
    synthetic benchmark and none elsewhere."""

    floors: str | None = None
    cot_not_worse: bool = True
    cot_tolerance: float = 0.0
    cot_confidence: float | None = 0.95  # None or 0: compare the means, not a paired test over the queries
    max_regression: float = 0.01

    def config(self, dataset: str):

        try:
            floors = gate_floors(dataset, self.floors)
        except ValueError as e:
            raise dg.Failure(description=f"gate floors {self.floors!r} {e}") from None
        return GateConfig(floors=floors, cot_not_worse=self.cot_not_worse,
                          cot_tolerance=self.cot_tolerance, cot_confidence=self.cot_confidence or None,
                          max_regression=self.max_regression)


class DeploymentResource(dg.ConfigurableResource):
    """Where and how ``deployment[d]`` delivers the service (``CIRCOT_DEPLOY`` and the ``CIRCOT_DEPLOY_*``
    variables, docs/deployment.md): ``target`` none (export and manifests only) or kubernetes."""

    target: str = "none"
    kube_context: str | None = None
    namespace: str = "circot"
    image: str = "circot"
    replicas: int = 2
    gpus: int = 0
    cpu: str = "2"
    memory: str = "8Gi"
    token_secret: str = "circot-api-token"
    timeout_s: float = 900.0
    kube_version: str = "1.31"


def resources_from_environment(*, project_dir: str | None = None, artifacts_root: str | None = None,
                               dataset_roots: dict[str, str] | None = None, dvc_remote: str | None = None,
                               dvc_push: bool = True, annotator: AnnotatorResource | None = None,
                               training: TrainingResource | None = None, gate: GateResource | None = None) -> dict:
    """The resources, each from its argument when given, else from the environment
    (:class:`model_code.settings.PipelineSettings`: every variable, its default and meaning are in
    docs/configuration.md). An unusable variable never stops the definitions from loading: its
    default is used here, and every run refuses to start while it is set (the artifacts resource
    carries the messages)."""

    s, errors = load(PipelineSettings)
    return {
        "datasets": DatasetRoots(roots=s.dataset_roots() if dataset_roots is None else
                                 {k: v for k, v in dataset_roots.items() if v}),
        "dvc": DvcResource(project_dir=project_dir or s.project_dir or os.getcwd(),
                           remote=dvc_remote or s.dvc_remote, push=dvc_push),
        "artifacts": ArtifactStore(root=artifacts_root or s.artifacts, cache=s.artifacts_cache,
                                   configuration_errors=errors),
        "annotator": annotator or AnnotatorResource(
            kind=s.teacher, chains_file=s.teacher_chains, local_model_path=s.teacher_model_path,
            remote_base_url=s.teacher_url, remote_model=s.teacher_model, api_key_env=s.teacher_api_key_env),
        "training": training or TrainingResource(
            profile=s.profile, base_model_path=s.base_model_path, launcher=s.training_launcher,
            processes=s.training_processes, k8s_image=s.k8s_image, k8s_namespace=s.k8s_namespace,
            k8s_gpus=s.k8s_gpus, k8s_artifacts_volume=s.k8s_artifacts_pvc, lora_rank=s.lora_rank,
            learning_rate=s.learning_rate, batch_size=s.batch_size, max_pixels=s.max_pixels,
            max_chain_tokens=s.max_chain_tokens, gradient_checkpointing=s.gradient_checkpointing,
            overrides=s.profile_overrides()),
        "index": IndexResource(uri=s.index_uri),
        "deploy": DeploymentResource(
            target=s.deploy, kube_context=s.kube_context, namespace=s.deploy_namespace, image=s.deploy_image,
            replicas=s.deploy_replicas, gpus=s.deploy_gpus, cpu=s.deploy_cpu, memory=s.deploy_memory,
            token_secret=s.deploy_token_secret, timeout_s=s.deploy_timeout_s, kube_version=s.kube_version),
        "gate": gate or GateResource(
            floors=s.gate_floors, cot_not_worse=s.gate_cot_not_worse, cot_tolerance=s.gate_cot_tolerance,
            cot_confidence=s.gate_cot_confidence, max_regression=s.gate_max_regression),
    }
