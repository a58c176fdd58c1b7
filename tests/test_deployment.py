"""deployment[d]'s manifests checked against the Kubernetes OpenAPI schema (offline, strict), and the
apply path through the real Kubernetes Python client against a recording fake API server on loopback:
which calls it makes, in which order, with which context's credentials; a missing Secret, a refused
manifest and a stuck rollout fail saying why."""

import base64
import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from assets import deployment as dep
from assets.resources import DeploymentResource

SPEC = dep.ServiceSpec(dataset="cirr", bento_tag="circot:cirr-0123456789abcdef", model_tag="cir-cot:0123456789abcdef",
                       image="registry.example/circot:cirr-0123456789abcdef", namespace="serving", replicas=3,
                       gpus=0, cpu="2", memory="8Gi", token_secret="circot-api-token",
                       index_uri="s3://bucket/circot/lancedb", artifacts="s3://bucket/circot")


def _by_kind(manifests: list[dict]) -> dict[str, dict]:
    return {m["kind"]: m for m in manifests}


def test_manifests_validate_against_the_kubernetes_schema_and_say_what_the_pods_need():
    manifests = dep.render(SPEC)
    assert [m["kind"] for m in manifests] == ["ConfigMap", "Service", "PodDisruptionBudget", "Deployment"]
    assert dep.validate(manifests, "1.31") == [] and dep.validate(manifests, "1.37") == []
    k = _by_kind(manifests)
    assert k["ConfigMap"]["data"] == {
        "CIRCOT_SERVE_DATASET": "cirr", "CIRCOT_LOG_JSON": "1", "CIRCOT_METRICS_OPEN": "1",
        "CIRCOT_LIVENESS_GRACE_S": "60", "CIRCOT_INDEX_URI": "s3://bucket/circot/lancedb",
        "CIRCOT_ARTIFACTS": "s3://bucket/circot"}
    d = k["Deployment"]
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == SPEC.image and d["spec"]["replicas"] == 3 and d["metadata"]["namespace"] == "serving"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert "startupProbe" not in c   # /livez gives a starting process CIRCOT_LIVENESS_STARTUP_S itself
    assert c["env"] == [{"name": "CIRCOT_API_TOKEN",
                         "valueFrom": {"secretKeyRef": {"name": "circot-api-token", "key": "token"}}}]
    assert c["envFrom"] == [{"configMapRef": {"name": "circot-cirr"}}]
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and "tolerations" not in pod
    assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert d["spec"]["template"]["metadata"]["labels"]["circot/model-version"] == "0123456789abcdef"
    assert k["Service"]["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]
    assert k["PodDisruptionBudget"]["spec"]["minAvailable"] == 2
    # a GPU pod asks the device plugin's resource and tolerates the GPU nodes' taint; one replica: no PDB deadlock
    gpu = _by_kind(dep.render(dep.ServiceSpec(**{**SPEC.__dict__, "gpus": 2, "replicas": 1})))
    resources = gpu["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "2" and resources["requests"]["nvidia.com/gpu"] == "2"
    assert gpu["Deployment"]["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert gpu["PodDisruptionBudget"]["spec"] == {"maxUnavailable": 1, "selector": k["PodDisruptionBudget"]["spec"][
        "selector"]}
    assert dep.validate(list(gpu.values()), "1.31") == []
    # the config's checksum is in the pod template: a changed ConfigMap rolls the pods
    other = dep.render(dep.ServiceSpec(**{**SPEC.__dict__, "index_uri": "s3://other/lancedb"}))
    annotation = "circot/config"
    assert (_by_kind(other)["Deployment"]["spec"]["template"]["metadata"]["annotations"][annotation]
            != d["spec"]["template"]["metadata"]["annotations"][annotation])
    # the YAML written is these manifests
    assert list(yaml.safe_load_all(dep.to_yaml(manifests))) == manifests


def test_the_schema_check_is_real_strict_and_names_the_field():
    manifests = dep.render(SPEC)
    typo = copy.deepcopy(manifests)
    typo[3]["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/livez"
    assert dep.validate(typo, "1.31") == [
        "Deployment/circot-cirr: spec.template.spec.containers.0.livenessProbe.httpGet: Additional properties are "
        "not allowed ('paht' was unexpected)"]
    wrong = copy.deepcopy(manifests)
    wrong[1]["spec"]["ports"][0].pop("port")
    wrong[3]["spec"]["replicas"] = "three"
    problems = dep.validate(wrong, "1.31")
    assert problems == ["Service/circot-cirr: spec.ports.0: 'port' is a required property",
                        "Deployment/circot-cirr: spec.replicas: 'three' is not of type 'integer', 'null'"]
    assert all("no schema of it for Kubernetes 1.99" in p for p in dep.validate(manifests, "1.99"))
    unknown = copy.deepcopy(manifests)
    unknown[2]["apiVersion"] = "policy/v1beta1"   # removed in Kubernetes 1.25
    assert "PodDisruptionBudget/circot-cirr" in dep.validate(unknown, "1.31")[0]


class FakeKubernetes:
    """A Kubernetes API server on loopback that records every request and keeps what is applied;
    ``rollout``: "ready" (the Deployment becomes ready after a few status reads), "stuck" (its pod
    cannot pull its image); ``refuse``: a kind answered 422."""

    def __init__(self, rollout: str = "ready", secret: bool = True, refuse: str | None = None):
        self.calls: list[dict] = []
        self.objects: dict[str, dict] = {}
        self.rollout, self.refuse, self.status_reads = rollout, refuse, 0
        if secret:
            self.objects["/api/v1/namespaces/serving/secrets/circot-api-token"] = {
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "circot-api-token", "namespace": "serving"},
                "data": {"token": base64.b64encode(b"t0k").decode()}}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self, body=None):
                url = urlparse(self.path)
                fake.calls.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                   "content_type": self.headers.get("Content-Type"),
                                   "authorization": self.headers.get("Authorization"), "body": body})
                return url

            def do_GET(self):
                url = self._record()
                if url.path.endswith("/pods"):
                    return self._answer(200, fake.pods(parse_qs(url.query).get("labelSelector", [""])[0]))
                if url.path.endswith("/status"):
                    return self._answer(200, fake.deployment_status(url.path.removesuffix("/status")))
                if url.path in fake.objects:
                    return self._answer(200, fake.objects[url.path])
                return self._answer(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                          "reason": "NotFound", "code": 404, "message": f"{url.path} not found"})

            def do_PATCH(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                url = self._record(body)
                if body.get("kind") == fake.refuse:
                    return self._answer(422, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                              "reason": "Invalid", "code": 422, "message": "spec: Invalid value"})
                old = fake.objects.get(url.path, {}).get("metadata", {}).get("generation", 0)
                fake.objects[url.path] = {**body, "metadata": {**body["metadata"], "generation": old + 1}}
                return self._answer(200, fake.objects[url.path])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def deployment_status(self, path: str) -> dict:
        """The first read is of the previous generation, with the deadline its rollout exceeded (a
        controller that has not caught up yet); then this generation's, ready at the third read
        (``rollout`` "ready")."""
        d = copy.deepcopy(self.objects[path])
        self.status_reads += 1
        want = d["spec"]["replicas"]
        if self.status_reads == 1:
            d["status"] = {"observedGeneration": d["metadata"]["generation"] - 1, "replicas": want,
                           "updatedReplicas": want, "availableReplicas": 0, "conditions": [
                               {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                "message": "the previous rollout failed"}]}
            return d
        done = want if (self.rollout == "ready" and self.status_reads >= 3) else 0
        d["status"] = {"observedGeneration": d["metadata"]["generation"], "replicas": want,
                       "updatedReplicas": done, "readyReplicas": done, "availableReplicas": done}
        return d

    def pods(self, selector: str) -> dict:
        """The old model's pod, crash-looping (why a rollback is delivered), and the new model's pod:
        waiting for its image (``rollout`` "stuck"), unscheduled ("pending"), or being created."""
        new = self.objects["/apis/apps/v1/namespaces/serving/deployments/circot-cirr"]["spec"]["template"]
        new_labels = new["metadata"]["labels"]
        old_labels = {**new_labels, "circot/model-version": "fedcba9876543210"}
        waiting = ({"reason": "ImagePullBackOff", "message": "Back-off pulling image \"registry.example/circot\""}
                   if self.rollout == "stuck" else {"reason": "ContainerCreating"})

        def pod(name, labels, waiting, conditions=()):
            return {"metadata": {"name": name, "labels": labels},
                    "status": {"conditions": list(conditions), "containerStatuses": [
                        {"name": "circot", "image": "x", "imageID": "", "ready": False, "restartCount": 3,
                         "state": {"waiting": waiting}}]}}

        unscheduled = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]
        pods = [pod("circot-cirr-old-zyxwv", old_labels, {"reason": "CrashLoopBackOff", "message": "back-off"}),
                pod("circot-cirr-5d9f-abcde", new_labels, waiting,
                    unscheduled if self.rollout == "pending" else ())]
        wanted = dict(pair.split("=", 1) for pair in selector.split(",") if pair)
        return {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [
            p for p in pods if all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())]}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kubeconfig(tmp_path, monkeypatch):
    """A kubeconfig with two contexts: ``prod`` (the fake, token "prod-token") and the current one,
    ``elsewhere`` (an address nothing listens on): applying to ``prod`` must use prod's."""
    def write(url: str) -> Path:
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "elsewhere",
            "clusters": [{"name": "prod", "cluster": {"server": url}},
                         {"name": "elsewhere", "cluster": {"server": "http://127.0.0.1:9"}}],
            "users": [{"name": "prod-user", "user": {"token": "prod-token"}},
                      {"name": "other-user", "user": {"token": "other-token"}}],
            "contexts": [{"name": "prod", "context": {"cluster": "prod", "user": "prod-user"}},
                         {"name": "elsewhere", "context": {"cluster": "elsewhere", "user": "other-user"}}]}))
        monkeypatch.setenv("KUBECONFIG", str(path))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        return path
    return write


@pytest.fixture
def no_export(monkeypatch):
    """The Bento export stands aside (a file in its place): these tests are about the cluster; the real
    export is imported and served in tests/test_service_ops.py."""
    def export(tag: str, folder: Path) -> Path:
        path = folder / f"{tag.replace(':', '-')}.bento"
        path.write_bytes(b"bento")
        return path
    monkeypatch.setattr(dep, "export", export)


KUBE = DeploymentResource(target="kubernetes", kube_context="prod", namespace="serving", replicas=3, timeout_s=30)


def test_delivery_applies_each_manifest_server_side_then_waits_for_the_rollout(kubeconfig, no_export, tmp_path):
    fake = FakeKubernetes()
    kubeconfig(fake.url)
    said = []
    try:
        record = dep.deliver(SPEC, tmp_path, KUBE, said.append, poll_s=0.01)
    finally:
        fake.close()
    manifests = dep.render(SPEC)
    assert {c["authorization"] for c in fake.calls} == {"Bearer prod-token"}   # the context asked, not the current
    assert [(c["method"], c["path"]) for c in fake.calls[:5]] == [
        ("GET", "/api/v1/namespaces/serving/secrets/circot-api-token"),
        ("PATCH", "/api/v1/namespaces/serving/configmaps/circot-cirr"),
        ("PATCH", "/api/v1/namespaces/serving/services/circot-cirr"),
        ("PATCH", "/apis/policy/v1/namespaces/serving/poddisruptionbudgets/circot-cirr"),
        ("PATCH", "/apis/apps/v1/namespaces/serving/deployments/circot-cirr")]
    patches = [c for c in fake.calls if c["method"] == "PATCH"]
    assert [c["body"] for c in patches] == manifests   # server-side apply of the manifests as written
    # (the client sends force=True, which the API server's strconv.ParseBool reads)
    assert all(c["content_type"] == "application/apply-patch+yaml"
               and c["query"] == {"fieldManager": ["circot"], "force": ["True"]} for c in patches)
    # a stale status (the previous generation's failed deadline) is not this rollout's; the old model's
    # crash-looping pod is not this rollout's either
    reads = [c["path"] for c in fake.calls[5:] if c["path"].endswith("/status")]
    assert len(reads) == 3 and reads[0] == "/apis/apps/v1/namespaces/serving/deployments/circot-cirr/status"
    assert record["applied"] == ["ConfigMap/circot-cirr", "Service/circot-cirr", "PodDisruptionBudget/circot-cirr",
                                 "Deployment/circot-cirr"]
    assert record["rollout"]["available"] == 3 and record["target"] == "kubernetes"
    assert json.loads((tmp_path / "delivery.json").read_text()) == record
    assert list(yaml.safe_load_all((tmp_path / "manifests.yaml").read_text())) == manifests
    assert any("3/3 pods of the new model ready" in s for s in said), said


def _refused(kubeconfig, tmp_path, match: str, deploy=KUBE, **fake_setup) -> FakeKubernetes:
    """A delivery to a FakeKubernetes(**fake_setup) that fails with a DeliveryError matching ``match``."""
    fake = FakeKubernetes(**fake_setup)
    kubeconfig(fake.url)
    try:
        with pytest.raises(dep.DeliveryError, match=match):
            dep.deliver(SPEC, tmp_path, deploy, print, poll_s=0.01)
    finally:
        fake.close()
    return fake


def test_a_missing_secret_a_refused_manifest_and_a_stuck_rollout_fail_saying_why(kubeconfig, no_export, tmp_path):
    fake = _refused(kubeconfig, tmp_path, "kubectl -n serving create secret generic circot-api-token", secret=False)
    assert [c["method"] for c in fake.calls] == ["GET"]   # nothing applied without the token's Secret
    _refused(kubeconfig, tmp_path, "the cluster refused Deployment/circot-cirr: 422", refuse="Deployment")
    fake = _refused(kubeconfig, tmp_path, "stuck: pod circot-cirr-5d9f-abcde: ImagePullBackOff", rollout="stuck")
    pods = [c for c in fake.calls if c["path"].endswith("/pods")]
    assert pods and "circot/model-version=0123456789abcdef" in pods[0]["query"]["labelSelector"][0]
    # no node for the new pod: waited for, and said when the time is up
    _refused(kubeconfig, tmp_path, "not ready after 0.3 s .*circot-cirr-5d9f-abcde not scheduled: 0/3 nodes are "
                                   "available: 3 Insufficient nvidia.com/gpu.; the previous pods keep serving",
             deploy=DeploymentResource(target="kubernetes", kube_context="prod", namespace="serving", timeout_s=0.3),
             rollout="pending")
    # a context the kubeconfig does not have
    with pytest.raises(dep.DeliveryError, match="no Kubernetes configuration for context nowhere"):
        dep.deliver(SPEC, tmp_path, DeploymentResource(target="kubernetes", kube_context="nowhere",
                                                       namespace="serving"), print)


def test_a_local_index_is_not_delivered_to_a_cluster(no_export, tmp_path):
    local = dep.ServiceSpec(**{**SPEC.__dict__, "index_uri": "", "artifacts": ""})
    with pytest.raises(dep.DeliveryError, match="local folder the pods cannot read"):
        dep.deliver(local, tmp_path, KUBE, print)
    assert not list(tmp_path.iterdir())   # refused before anything was written
    record = dep.deliver(local, tmp_path, DeploymentResource(), print)   # no cluster: written, nothing applied
    assert record["applied"] == [] and record["rollout"] is None and (tmp_path / "manifests.yaml").is_file()
