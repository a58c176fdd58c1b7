"""Serving the micro model for the service tests: a model store with it promoted, its gallery index, a
real `bentoml serve` on loopback and a small HTTP client (no third-party client)."""

import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tests.conftest import REPO, free_port

SETUP = """
import sys
from model_code import registry
from model_code.data import read_dataset
from model_code.index import GalleryImage, GalleryIndex
from model_code.model.cir_cot import CirCoTModel
model_dir, root, index_uri, splits, *datasets = sys.argv[1:]
m = CirCoTModel.load(model_dir, device="cpu")
bench = read_dataset("synthetic", root)
shown = bench.images[bench.images.split.isin(splits.split(","))]
images = [GalleryImage(i, s, root + "/" + p) for i, s, p in zip(shown.image_id, shown.split, shown.path)]
for dataset in datasets:   # the tiny benchmark's splits (by default its test split) stand for each dataset's gallery
    registry.promote(model_dir, version=m.version, dataset=dataset, labels={})
    GalleryIndex(index_uri, dataset).build(lambda ps: m.embed_images(ps), images, model_version=m.version)
print(m.version)
"""


class Server:
    def __init__(self, env: dict, log: Path, target: str = "serving.service:CirCoTService", cwd: Path = REPO):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", target,
                                      "--host", "127.0.0.1", "--port", str(self.port)], cwd=cwd, env=env,
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT)

    def wait(self, status: int = 200, path: str = "/readyz", timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.log.read_text()[-2000:]}")
            try:
                code = self.request("GET", path)[0]
                if code == status:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{path} never answered {status}: {self.log.read_text()[-2000:]}")

    def request(self, method: str, path: str, fields: dict | None = None, files: dict | None = None,
                headers: dict | None = None) -> tuple[int, bytes]:
        return self.call(method, path, fields, files, headers)[:2]

    def call(self, method: str, path: str, fields: dict | None = None, files: dict | None = None,
             headers: dict | None = None, timeout: float = 120) -> tuple[int, bytes, dict]:
        """(status, body, headers); ``files`` maps a field to (filename, bytes) or a list of them."""
        body, head = None, dict(headers or {})
        if fields is not None or files is not None:
            boundary = uuid.uuid4().hex
            body = multipart(fields, files, boundary)
            head["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=head)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}

    def raw(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, bytes]:
        """(status, body) of a request sent as given: no header added but Host and the body's length
        (urllib would add a Content-Type); ``body`` an iterable of bytes: sent chunked."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body, headers or {}, encode_chunked=not isinstance(body, (bytes, type(None))))
            answer = conn.getresponse()
            return answer.status, answer.read()
        finally:
            conn.close()

    def post_json(self, path: str, payload, headers: dict | None = None) -> tuple[int, bytes]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def search(self, image: bytes, modification: str = "make the star red", headers=None, **fields):
        return self.request("POST", "/search", {"modification": modification, **fields},
                            {"image": ("ref.png", image)}, headers)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def workers(self, service: str) -> list:
        """The worker processes (psutil) of one BentoML service: ``circot`` (the front), ``circot-encoder``
        or ``circot-reasoner``."""
        import psutil

        def name(p):
            try:
                line = p.cmdline()
            except psutil.Error:   # gone meanwhile
                return None
            return line[line.index("--service-name") + 1] if "--service-name" in line else None

        return [p for p in psutil.Process(self.proc.pid).children(recursive=True) if name(p) == service]


def kill(victim) -> float:
    """SIGKILL ``victim`` (a psutil process found beforehand: finding it takes a while) and confirm it
    died: gone, or a zombie until BentoML's arbiter reaps it (not our child, so there is no exit status
    to read). Returns when the signal was sent (``time.monotonic()``)."""
    import signal

    import psutil

    killed = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    while time.monotonic() - killed < 5:
        try:
            if victim.status() == psutil.STATUS_ZOMBIE:
                return killed
        except psutil.NoSuchProcess:
            return killed
        time.sleep(0.01)
    raise AssertionError(f"{victim.pid} was still running 5 s after SIGKILL")




def multipart(fields: dict | None, files: dict | None, boundary: str) -> bytes:
    """A multipart/form-data body: ``fields`` as text parts, ``files`` (a field to (filename, bytes) or a
    list of them) as file parts."""
    out = io.BytesIO()
    for name, value in (fields or {}).items():
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode())
    for name, given in (files or {}).items():
        for filename, data in (given if isinstance(given, list) else [given]):
            out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                      "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def prepare(home: Path, micro_base: Path, tiny_synthetic: Path, datasets: tuple[str, ...] = ("synthetic",),
            splits: tuple[str, ...] = ("test",)):
    """A model store under ``home`` with the micro model (random LoRA) in production for ``datasets``,
    and the gallery index of each (the tiny benchmark's ``splits``, by default its test split, from a
    copy: a test may remove an image); returns the environment to serve it, the model version and a
    reference image (of the test split)."""
    import torch

    from model_code.backbone import load_backbone
    from model_code.model.cir_cot import CirCoTModel, apply_lora

    torch.manual_seed(0)
    model, processor = load_backbone(micro_base, device="cpu")
    m = CirCoTModel(apply_lora(model, processor, r=2, alpha=4), processor, base_path=str(micro_base))
    m.save(home / "model")
    env = {**os.environ, "BENTOML_HOME": str(home / "bentoml"), "CIRCOT_INDEX_URI": str(home / "lancedb"),
           "CIRCOT_SERVE_DATASET": datasets[0],
           "CIRCOT_ARTIFACTS": str(home / "artifacts"), "PYTHONPATH": str(REPO), "BENTOML_DO_NOT_TRACK": "True"}
    for name in ("CIRCOT_API_TOKEN", "CIRCOT_MODEL_TAG", "CIRCOT_LOG_JSON", "CIRCOT_METRICS_OPEN"):
        env.pop(name, None)
    gallery = home / "cir-shapes"
    shutil.copytree(tiny_synthetic, gallery)
    out = subprocess.run([sys.executable, "-c", SETUP, str(home / "model"), str(gallery), str(home / "lancedb"),
                          ",".join(splits), *datasets], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    image = sorted((tiny_synthetic / "images" / "test").glob("*.png"))[0].read_bytes()
    return env, out.stdout.split()[-1], image


def error_of(body: bytes) -> str:
    """The message of an error answer, which has one shape: {"error": "..."}."""
    data = json.loads(body)
    assert isinstance(data, dict) and set(data) == {"error"}, data
    assert not re.search(r"object at 0x|<\w[^>]* at 0x", data["error"]), data   # no internal object text
    return data["error"]
