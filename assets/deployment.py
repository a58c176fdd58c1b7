"""deployment[d]: the production model's Bento delivered (docs/deployment.md).

After ``bento[d]``: the Bento is exported (``bentoml export``) to the artifacts store, under
``deployments/<d>/<Bento version>/``, with the Kubernetes manifests that serve it (a ConfigMap, the
Deployment with its probes, a Service and a PodDisruptionBudget) checked against the Kubernetes
OpenAPI schema. With ``CIRCOT_DEPLOY=kubernetes`` they are applied (server-side apply, through the
Kubernetes API) and the rollout is awaited until every pod of the new model is ready; otherwise
the asset stops after writing, and says so. ``circot rollback`` delivers the previous production
model the same way.

The pods run the image ``<CIRCOT_DEPLOY_IMAGE>:<Bento version>`` (``bentoml containerize`` of the
export), read the API token from a Secret the operator creates, and the index URI and artifacts
root from the ConfigMap.
"""

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import urllib3
import yaml

from assets.bento import bento, bento_version
from assets.common import dataset_partitions
from assets.resources import ArtifactStore, DeploymentResource, IndexResource
from model_code import registry
from model_code.index import GalleryIndexError, index_uri

PORT = 3000                  # where a Bento's image serves
MANAGER = "circot"           # the field manager of the server-side apply
GPU = "nvidia.com/gpu"
# kinds in the order they are applied: what the pods read exists before they start
ORDER = ("ConfigMap", "Service", "PodDisruptionBudget", "Deployment")
# a container waiting for one of these is not going to become ready by waiting longer
STUCK = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CrashLoopBackOff", "CreateContainerConfigError",
         "CreateContainerError")


class DeliveryError(Exception):
    """The manifests are invalid, the cluster refused them, or the rollout did not become ready
    (``status``: the API's HTTP status, where it answered one)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServiceSpec:
    """What the manifests of one dataset's service say."""

    dataset: str
    bento_tag: str            # circot:<dataset>-<model version>
    model_tag: str            # cir-cot:<model version>
    image: str                # <repository>:<Bento version>
    # where and how, from the DeploymentResource (its defaults are the settings'): no default of its own here
    namespace: str
    replicas: int
    gpus: int
    cpu: str
    memory: str
    token_secret: str
    index_uri: str            # "" where the pods cannot reach the index (a local folder)
    artifacts: str            # "" for a local artifacts root
    liveness_grace_s: float = 60.0

    @property
    def name(self) -> str:
        return f"circot-{self.dataset}"

    @property
    def model_version(self) -> str:
        return self.model_tag.split(":", 1)[1]


def render(spec: ServiceSpec) -> list[dict]:
    """The service's manifests, in the order they are applied."""
    labels = {"app.kubernetes.io/name": "circot", "app.kubernetes.io/instance": spec.name,
              "app.kubernetes.io/component": "service", "circot/dataset": spec.dataset}
    pod_labels = {**labels, "circot/model-version": spec.model_version}
    meta = {"name": spec.name, "namespace": spec.namespace, "labels": labels}
    config = {"CIRCOT_SERVE_DATASET": spec.dataset, "CIRCOT_LOG_JSON": "1", "CIRCOT_METRICS_OPEN": "1",
              "CIRCOT_LIVENESS_GRACE_S": f"{spec.liveness_grace_s:g}",
              **({"CIRCOT_SERVE_GPU": "1"} if spec.gpus else {}),
              **({"CIRCOT_INDEX_URI": spec.index_uri} if spec.index_uri else {}),
              **({"CIRCOT_ARTIFACTS": spec.artifacts} if spec.artifacts else {})}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": config}
    resources = {"requests": {"cpu": spec.cpu, "memory": spec.memory}, "limits": {"memory": spec.memory}}
    if spec.gpus:
        resources["requests"][GPU] = str(spec.gpus)
        resources["limits"][GPU] = str(spec.gpus)

    def probe(path: str, period: int, failures: int) -> dict:
        return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 5,
                "failureThreshold": failures}

    container = {
        "name": "circot", "image": spec.image, "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": PORT}],
        "envFrom": [{"configMapRef": {"name": spec.name}}],
        "env": [{"name": "CIRCOT_API_TOKEN",
                 "valueFrom": {"secretKeyRef": {"name": spec.token_secret, "key": "token"}}}],
        "resources": resources,
        "readinessProbe": probe("/readyz", 5, 3),
        # 503 once the encoder or the reasoner has not answered for CIRCOT_LIVENESS_GRACE_S (before its
        # first answer: CIRCOT_LIVENESS_STARTUP_S, while its process starts): the container is restarted
        "livenessProbe": probe("/livez", 10, 3),
    }
    pod = {"containers": [container], "terminationGracePeriodSeconds": 30}
    if spec.gpus:
        pod["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    checksum = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {**meta, "annotations": {"circot/bento": spec.bento_tag, "circot/model": spec.model_tag}},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/instance": spec.name}},
            # a new model never lowers the ready pods: one more pod at a time, an old one leaves once it is ready
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": 900,
            "template": {"metadata": {"labels": pod_labels,
                                      "annotations": {"circot/bento": spec.bento_tag, "circot/config": checksum}},
                         "spec": pod},
        },
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta,
               "spec": {"selector": {"app.kubernetes.io/instance": spec.name},
                        "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
    budget = {"minAvailable": spec.replicas - 1} if spec.replicas > 1 else {"maxUnavailable": 1}
    pdb = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta,
           "spec": {**budget, "selector": {"matchLabels": {"app.kubernetes.io/instance": spec.name}}}}
    by_kind = {m["kind"]: m for m in (config_map, service, pdb, deployment)}
    return [by_kind[k] for k in ORDER]


def validate(manifests: list[dict], kube_version: str) -> list[str]:
    """Each manifest checked against the Kubernetes OpenAPI schema of ``kube_version`` (strict:
    unknown fields are errors), offline with the schemas kubernetes-validate ships. Returns one line
    per problem (none: valid)."""
    import kubernetes_validate

    problems = []
    for m in manifests:
        where = f"{m.get('kind', '?')}/{m.get('metadata', {}).get('name', '?')}"
        try:
            kubernetes_validate.validate(m, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(top)"
            problems.append(f"{where}: {path}: {e.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError,
                kubernetes_validate.utils.VersionNotSupportedError, IndexError) as e:
            why = getattr(e, "message", "") or str(e) or type(e).__name__
            problems.append(f"{where}: no schema of it for Kubernetes {kube_version} ({why})")
    return problems


def to_yaml(manifests: list[dict]) -> str:
    return yaml.safe_dump_all(manifests, sort_keys=False)


def export(tag: str, folder: Path) -> Path:
    """``bentoml export`` of the Bento ``tag`` into ``folder`` (written whole, then renamed)."""
    import bentoml

    path = folder / f"{tag.replace(':', '-')}.bento"
    partial = folder / f".partial-{path.name}"   # ends in .bento: BentoML appends it to any other name
    partial.unlink(missing_ok=True)
    try:
        Path(bentoml.bentos.export_bento(tag, str(partial), output_format="bento")).replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


class Cluster:
    """The Kubernetes API of one context: server-side apply of manifests and the rollout's readiness."""

    def __init__(self, context: str | None = None):
        from kubernetes import client, config

        try:
            if context is None and config.incluster_config.SERVICE_HOST_ENV_NAME in os.environ:
                config.load_incluster_config()
                api_client = client.ApiClient()
            else:
                # KUBECONFIG read now (the client's default is read once, when it is imported)
                api_client = config.new_client_from_config(config_file=os.environ.get("KUBECONFIG") or None,
                                                           context=context)
        except (config.ConfigException, OSError) as e:
            raise DeliveryError(f"no Kubernetes configuration for context {context or '(current)'}: {e}") from None
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.policy = client.PolicyV1Api(api_client)
        self.ApiException = client.ApiException

    def _patch(self, manifest: dict):
        kind = manifest["kind"]
        call = {"ConfigMap": self.core.patch_namespaced_config_map, "Service": self.core.patch_namespaced_service,
                "PodDisruptionBudget": self.policy.patch_namespaced_pod_disruption_budget,
                "Deployment": self.apps.patch_namespaced_deployment}[kind]
        meta = manifest["metadata"]
        return call(meta["name"], meta["namespace"], manifest, field_manager=MANAGER, force=True,
                    _content_type="application/apply-patch+yaml")

    def check_secret(self, namespace: str, name: str) -> None:
        try:
            secret = self._call(f"read the Secret {namespace}/{name}", self.core.read_namespaced_secret, name,
                                namespace)
        except DeliveryError as e:
            if e.status == 404:
                raise DeliveryError(
                    f"the Secret {namespace}/{name} does not exist: the pods read the API token from it. Create it: "
                    f"kubectl -n {namespace} create secret generic {name} --from-literal=token=<token>") from None
            raise
        if "token" not in (secret.data or {}):
            raise DeliveryError(f"the Secret {namespace}/{name} has no key 'token' (the pods read CIRCOT_API_TOKEN "
                                "from it)")

    def apply(self, manifests: list[dict]) -> list[str]:
        """Server-side apply of each manifest, in order; returns ``Kind/name`` of each applied."""
        applied = []
        for m in manifests:
            where = f"{m['kind']}/{m['metadata']['name']}"
            try:
                self._patch(m)
            except self.ApiException as e:
                detail = (e.body or "")[:500] if isinstance(e.body, str) else ""
                raise DeliveryError(f"the cluster refused {where}: {e.status} {e.reason} {detail}".strip()) from None
            except (OSError, urllib3.exceptions.HTTPError) as e:
                raise DeliveryError(f"cannot apply {where}: the API server is unreachable ({type(e).__name__}: "
                                    f"{e}); applied before it: {', '.join(applied) or 'nothing'}") from None
            applied.append(where)
        return applied

    def rollout(self, namespace: str, name: str, timeout_s: float, say: Callable[[str], None],
                poll_s: float = 2.0, every_s: float = 15.0) -> dict:
        """Wait until the Deployment's new pods are all updated and available (what ``kubectl rollout
        status`` waits for); a DeliveryError when the deadline passes, the Deployment reports
        ProgressDeadlineExceeded, or a new pod is stuck (image pull, crash loop)."""
        start = last = time.monotonic()
        while True:
            d = self._call(f"read the status of Deployment {namespace}/{name}",
                           self.apps.read_namespaced_deployment_status, name, namespace)
            want = d.spec.replicas or 0
            s = d.status
            updated, ready, available = s.updated_replicas or 0, s.ready_replicas or 0, s.available_replicas or 0
            state = {"replicas": want, "updated": updated, "ready": ready, "available": available,
                     "seconds": round(time.monotonic() - start, 1)}
            # what `kubectl rollout status` reads: nothing of the status until it is of this generation
            current = (s.observed_generation or 0) >= (d.metadata.generation or 0)
            if current and updated == want and available == want and (s.replicas or 0) == want:
                say(f"rollout of {namespace}/{name}: {available}/{want} pods of the new model ready "
                    f"({state['seconds']:.0f} s)")
                return state
            if current:
                for c in s.conditions or []:
                    if c.type == "Progressing" and c.reason == "ProgressDeadlineExceeded":
                        raise DeliveryError(f"rollout of {namespace}/{name} failed: {c.message}")
            # the new pods only (the old ones may be failing: that is when a rollback is delivered)
            stuck, waiting = self._new_pods(namespace, d.spec.template.metadata.labels or {})
            if stuck:
                raise DeliveryError(f"rollout of {namespace}/{name} is stuck: {'; '.join(stuck)}")
            elapsed = time.monotonic() - start
            if elapsed > timeout_s:
                raise DeliveryError(f"rollout of {namespace}/{name} not ready after {timeout_s:g} s "
                                    f"(CIRCOT_DEPLOY_TIMEOUT_S): {updated}/{want} updated, {available}/{want} "
                                    f"available{'; ' + '; '.join(waiting) if waiting else ''}; the previous pods "
                                    "keep serving")
            if time.monotonic() - last >= every_s:
                last = time.monotonic()
                say(f"rollout of {namespace}/{name}: {updated}/{want} updated, {ready}/{want} ready "
                    f"({elapsed:.0f} s of at most {timeout_s:g} s){'; ' + '; '.join(waiting) if waiting else ''}")
            time.sleep(poll_s)

    def _call(self, what: str, method, *args, **kwargs):
        """A call of the API, its failure a DeliveryError saying what was asked."""
        try:
            return method(*args, **kwargs)
        except self.ApiException as e:
            raise DeliveryError(f"cannot {what}: {e.status} {e.reason}", status=e.status) from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise DeliveryError(f"cannot {what}: the API server is unreachable ({type(e).__name__}: {e})") from None

    def _new_pods(self, namespace: str, labels: dict) -> tuple[list[str], list[str]]:
        """(pods of the new template that are stuck, pods that wait to be scheduled) with their reasons."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        stuck, waiting = [], []
        pods = self._call(f"list the pods of {namespace}", self.core.list_namespaced_pod, namespace,
                          label_selector=selector)
        for pod in pods.items:
            status = pod.status
            for cs in (status.container_statuses or []) if status else []:
                state = cs.state.waiting if cs.state else None
                if state is not None and state.reason in STUCK:
                    stuck.append(f"pod {pod.metadata.name}: {state.reason}: {(state.message or '')[:300]}")
            for c in (status.conditions or []) if status else []:
                if c.type == "PodScheduled" and c.status == "False":   # e.g. no node with a free GPU yet
                    waiting.append(f"pod {pod.metadata.name} not scheduled: {(c.message or c.reason or '')[:200]}")
        return stuck, waiting


def spec_for(dataset: str, prod: dict, deploy: DeploymentResource, artifacts: ArtifactStore,
             index: IndexResource) -> ServiceSpec:
    """The service spec of ``dataset``'s production model ``prod`` (a registry entry) with the settings."""
    version = bento_version(dataset, prod["version"])
    try:   # an index the pods can open: CIRCOT_INDEX_URI, or under an object-store root LanceDB opens
        uri = index_uri(artifacts.root, index.uri) if (index.uri or artifacts.remote) else ""
    except GalleryIndexError:   # a root LanceDB does not open: the index is in the pipeline's local copy
        uri = ""
    return ServiceSpec(dataset=dataset, bento_tag=f"circot:{version}", model_tag=prod["tag"],
                       image=f"{deploy.image}:{version}", namespace=deploy.namespace, replicas=deploy.replicas,
                       gpus=deploy.gpus, cpu=deploy.cpu, memory=deploy.memory, token_secret=deploy.token_secret,
                       index_uri=uri, artifacts=artifacts.root if artifacts.remote else "")


def deliver(spec: ServiceSpec, folder: Path, deploy: DeploymentResource, say: Callable[[str], None],
            poll_s: float = 2.0) -> dict:
    """Export the Bento and write its manifests into ``folder``; check them; apply them to the
    configured context when ``deploy.target`` is ``kubernetes``. Returns the delivery's record (also
    written as ``delivery.json``)."""
    if "://" not in spec.index_uri and deploy.target == "kubernetes":
        raise DeliveryError("the gallery index is in a local folder the pods cannot read: set CIRCOT_ARTIFACTS to an "
                            "object store (s3://...) or CIRCOT_INDEX_URI to an index the cluster reaches")
    manifests = render(spec)
    problems = validate(manifests, deploy.kube_version)
    if problems:
        raise DeliveryError(f"the manifests do not validate against Kubernetes {deploy.kube_version}:\n"
                            + "\n".join(problems))
    if deploy.target == "kubernetes":   # before the export: what the pods need must be there
        cluster = Cluster(deploy.kube_context)
        cluster.check_secret(spec.namespace, spec.token_secret)
    (folder / "manifests.yaml").write_text(to_yaml(manifests))
    started = time.monotonic()
    archive = export(spec.bento_tag, folder)
    say(f"exported {spec.bento_tag} to {archive} ({archive.stat().st_size / 2**20:.1f} MiB, "
        f"{time.monotonic() - started:.1f} s)")
    record = {"dataset": spec.dataset, "bento": spec.bento_tag, "model": spec.model_tag, "image": spec.image,
              "export": str(archive), "export_sha256": sha256(archive), "export_bytes": archive.stat().st_size,
              "manifests": str(folder / "manifests.yaml"), "validated_against": deploy.kube_version,
              "target": deploy.target, "namespace": spec.namespace, "applied": [], "rollout": None}
    if deploy.target == "kubernetes":
        record["applied"] = cluster.apply(manifests)
        say(f"applied {', '.join(record['applied'])} in {spec.namespace} (context "
            f"{deploy.kube_context or 'current'})")
        record["rollout"] = cluster.rollout(spec.namespace, spec.name, deploy.timeout_s, say, poll_s)
    (folder / "delivery.json").write_text(json.dumps(record, indent=2))
    return record


@dg.asset(partitions_def=dataset_partitions, group_name="serving", deps=[bento], kinds={"kubernetes"},
          description=__doc__.split("\n\n")[0])
def deployment(context: dg.AssetExecutionContext, artifacts: ArtifactStore, index: IndexResource,
               deploy: DeploymentResource) -> dg.MaterializeResult:
    name = context.partition_key
    prod = registry.production(name)
    if prod is None:
        raise dg.Failure(description=f"no production model of {name}: nothing to deliver")
    spec = spec_for(name, prod, deploy, artifacts, index)
    folder = artifacts.dir("deployments", name, bento_version(name, prod["version"]))
    try:
        record = deliver(spec, folder, deploy, context.log.info)
    except DeliveryError as e:
        raise dg.Failure(description=str(e)) from None
    finally:
        artifacts.push(folder)
    if artifacts.remote:   # where other machines and CI find the export
        rel = Path(record["export"]).relative_to(artifacts.local_root()).as_posix()
        record["export_uri"] = f"{artifacts.root.rstrip('/')}/{rel}"
        context.log.info(f"deployment[{name}]: the export is at {record['export_uri']}")
    if deploy.target == "none":
        context.log.info(f"deployment[{name}]: CIRCOT_DEPLOY=none: wrote {record['export']} and its manifests; "
                         f"nothing applied (docs/deployment.md: containerize, push, kubectl apply)")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"{spec.bento_tag}@{deploy.target}"),
        metadata={"path": dg.MetadataValue.path(str(folder)), "tag": spec.bento_tag, "image": spec.image,
                  "export": dg.MetadataValue.path(record.get("export_uri", record["export"])),
                  "export_mib": round(record["export_bytes"] / 2**20, 1),
                  "manifests": dg.MetadataValue.path(record["manifests"]),
                  "validated_against": f"Kubernetes {deploy.kube_version}", "target": deploy.target,
                  "applied": dg.MetadataValue.json(record["applied"]),
                  "rollout": dg.MetadataValue.json(record["rollout"] or {})})
