"""The BentoML service end to end: a real server on loopback, the micro model promoted and its index built."""

import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests._png import pixels
from tests.conftest import REPO, free_port

SETUP = """
import sys
from model_code import registry
from model_code.data import read_dataset
from model_code.index import GalleryImage, GalleryIndex
from model_code.model.cir_cot import CirCoTModel
model_dir, root, index_uri = sys.argv[1:4]
m = CirCoTModel.load(model_dir, device="cpu")
registry.promote(model_dir, version=m.version, dataset="synthetic", labels={})
bench = read_dataset("synthetic", root)
test = bench.images[bench.images.split == "test"]
images = [GalleryImage(i, "test", root + "/" + p) for i, p in zip(test.image_id, test.path)]
GalleryIndex(index_uri, "synthetic").build(lambda ps: m.embed_images(ps), images, model_version=m.version)
print(m.version)
"""


class Server:
    def __init__(self, env: dict, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "serving.service:CirCoTService",
                                      "--host", "127.0.0.1", "--port", str(self.port)], cwd=REPO, env=env,
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
        body, head = None, dict(headers or {})
        if fields is not None or files is not None:
            boundary = uuid.uuid4().hex
            out = io.BytesIO()
            for name, value in (fields or {}).items():
                out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                          f"{value}\r\n".encode())
            for name, (filename, data) in (files or {}).items():
                out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                          f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
                          + data + b"\r\n")
            out.write(f"--{boundary}--\r\n".encode())
            body = out.getvalue()
            head["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=head)
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


@pytest.fixture(scope="module")
def served(tmp_path_factory, micro_base, tiny_synthetic):
    """A model store with the micro model in production, its index, and the environment to serve them."""
    import torch

    from model_code.backbone import load_backbone
    from model_code.model.cir_cot import CirCoTModel, apply_lora

    home = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model, processor = load_backbone(micro_base, device="cpu")
    m = CirCoTModel(apply_lora(model, processor, r=2, alpha=4), processor, base_path=str(micro_base))
    m.save(home / "model")
    env = {**os.environ, "BENTOML_HOME": str(home / "bentoml"), "CIRCOT_INDEX_URI": str(home / "lancedb"),
           "CIRCOT_SERVE_DATASET": "synthetic", "PYTHONPATH": str(REPO)}
    env.pop("CIRCOT_API_TOKEN", None)
    import shutil

    gallery = home / "cir-shapes"  # a copy: a test removes one of its images
    shutil.copytree(tiny_synthetic, gallery)
    out = subprocess.run([sys.executable, "-c", SETUP, str(home / "model"), str(gallery), str(home / "lancedb")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    image = next((tiny_synthetic / "images" / "test").glob("*.png")).read_bytes()
    return env, out.stdout.split()[-1], image, home


@pytest.fixture(scope="module")
def server(served):
    env, version, image, home = served
    s = Server({**env, "CIRCOT_MAX_IMAGE_BYTES": "50000", "CIRCOT_MAX_IMAGE_PIXELS": "20000"}, home / "open.log")
    s.wait()
    yield s
    s.stop()


def _error(body: bytes) -> str:
    data = json.loads(body)
    return data[0]["error"] if isinstance(data, list) else data["error"]


def test_search_in_both_modes_with_reasoning_and_thumbnails(server, served):
    from PIL import Image

    from model_code.data import read_dataset

    _, version, image, home = served
    code, body = server.search(image, k=4, mode="cot")
    assert code == 200, body
    answer = json.loads(body)
    assert answer["model_version"] == version and answer["mode"] == "cot" and len(answer["results"]) == 4
    assert set(answer["reasoning"]) == {"caption", "reasoning", "conclusion", "raw", "error"}
    assert answer["reasoning"]["error"] is None and answer["reasoning"]["caption"]  # decoding keeps the format
    assert {"reasoning", "search"} <= set(answer["timings"])
    scores = [h["score"] for h in answer["results"]]
    assert scores == sorted(scores, reverse=True)
    code, body = server.search(image, k=3, mode="no_cot")
    assert code == 200 and json.loads(body)["reasoning"] is None and len(json.loads(body)["results"]) == 3
    code, png = server.request("GET", answer["results"][0]["url"] + "?size=32")
    assert code == 200
    gallery = read_dataset("synthetic", home / "cir-shapes").images.set_index("image_id").path
    with Image.open(home / "cir-shapes" / gallery[answer["results"][0]["image_id"]]) as im:
        im = im.convert("RGB")
        assert im.size == (64, 64)
        im.thumbnail((32, 32))  # the hit's own gallery image, shrunk to the size asked for
    assert pixels(png).shape == (32, 32, 3) and pixels(png).tobytes() == im.tobytes()
    code, body = server.request("POST", "/embed_image", files={"images": ("a.png", image)})
    assert code == 200 and len(json.loads(body)[0]) == 64
    code, page = server.request("GET", "/ui/")
    assert code == 200 and b"<form id=\"query\"" in page


def test_bad_input_is_a_clear_4xx_never_a_500(server, served):
    from PIL import Image

    _, _, image, _ = served
    big = io.BytesIO()
    Image.new("RGB", (200, 200), (1, 2, 3)).save(big, format="PNG")
    noisy = io.BytesIO()
    Image.frombytes("RGB", (150, 150), os.urandom(150 * 150 * 3)).save(noisy, format="PNG")  # > 50,000 bytes
    cases = [
        (dict(image=b"not an image at all"), 400, "not a readable image"),
        (dict(image=image[: len(image) // 2]), 400, "not a readable image"),
        (dict(image=noisy.getvalue()), 413, "bytes; at most 50000"),
        (dict(image=big.getvalue()), 413, "200x200 pixels"),
        (dict(image=image, modification="  "), 400, "modification text is empty"),
        (dict(image=image, modification="x" * 1001), 400, "at most 1000"),
        (dict(image=image, k=0), 400, "k must be from 1"),
        (dict(image=image, k=10_000), 400, "k must be from 1"),
        (dict(image=image, mode="both"), 400, "mode must be one of cot, no_cot"),
        (dict(image=image, dataset="cirr"), 404, "serves synthetic, not 'cirr'"),
    ]
    for kwargs, status, message in cases:
        code, body = server.search(**kwargs)
        assert code == status and message in _error(body), (kwargs.get("modification"), code, body[:300])
    code, body = server.request("GET", "/ui/images/synthetic/no-such-image")
    assert code == 404 and "no image" in _error(body)
    gone = sorted((served[3] / "cir-shapes" / "images" / "test").glob("*.png"))[-1]
    kept = gone.read_bytes()
    gone.unlink()  # the index names it, the disk no longer has it
    try:
        code, body = server.request("GET", f"/ui/images/synthetic/{gone.stem}")
        assert code == 404 and "cannot be read on this server" in _error(body)
    finally:
        gone.write_bytes(kept)
    assert server.proc.poll() is None  # still serving


def test_a_token_guards_every_call_but_the_health_endpoints(served):
    env, _, image, home = served
    s = Server({**env, "CIRCOT_API_TOKEN": "s3cret"}, home / "auth.log")
    try:
        s.wait()
        assert s.search(image)[0] == 401
        assert s.search(image, headers={"Authorization": "Bearer wrong"})[0] == 401
        code, body = s.search(image, mode="no_cot", headers={"Authorization": "Bearer s3cret"})
        assert code == 200 and json.loads(body)["results"]
        assert s.request("GET", "/ui/images/synthetic/x")[0] == 401
        assert [s.request("GET", p)[0] for p in ("/livez", "/healthz", "/readyz", "/ui/")] == [200, 200, 200, 200]
    finally:
        s.stop()
    assert "open to anyone" in (home / "open.log").read_text()
    assert "open to anyone" not in (home / "auth.log").read_text()


def test_without_a_production_model_it_is_alive_but_not_ready(served):
    env, _, image, home = served
    s = Server({**env, "BENTOML_HOME": str(home / "empty-store")}, home / "empty.log")
    try:
        s.wait(200, "/livez")
        s.wait(503, "/readyz")
        deadline = time.time() + 60
        while True:   # "still loading" until the background load has looked in the store
            code, body = s.search(image)
            if "still loading" not in _error(body) or time.time() > deadline:
                break
            time.sleep(0.5)
        assert code == 503 and "no production model of synthetic" in _error(body) and "make run" in _error(body)
    finally:
        s.stop()


def test_the_page_answers_a_query_with_reasoning_and_thumbnails(server, served, page: Page, tmp_path):
    from PIL import Image

    _, version, image, _ = served
    code, body = server.search(image, "make the star red", k=3, mode="cot")   # what the page must show
    assert code == 200, body
    answer = json.loads(body)
    reference = tmp_path / "reference.png"
    reference.write_bytes(image)
    with Image.open(reference) as im:
        side = im.width   # the benchmark's images are square, all of one size
    page.goto(server.url + "/ui/")
    page.set_input_files("#image", reference)
    expect(page.locator("#preview img")).to_have_js_property("naturalWidth", side)   # the reference is shown
    page.fill("#modification", "make the star red")
    page.fill("#k", "3")
    page.click("#submit")
    expect(page.locator("#status")).to_contain_text(f"model {version} · cot · ", timeout=120_000)
    expect(page.locator("#reasoning .section b")).to_have_text(["caption", "reasoning", "conclusion"])
    expect(page.locator("#reasoning .section span")).to_have_text(
        [answer["reasoning"][part] for part in ("caption", "reasoning", "conclusion")])
    thumbnails = page.locator("#results figure img")
    expect(thumbnails).to_have_count(3)
    for thumbnail, hit in zip(thumbnails.all(), answer["results"]):   # the service's ranking, each image loaded
        expect(thumbnail).to_have_attribute("alt", hit["image_id"])
        expect(thumbnail).to_have_js_property("naturalWidth", min(side, 128))
    shot = tmp_path / "ui-search.png"
    page.screenshot(path=shot)
    with Image.open(shot) as im:   # a whole picture of a page, not a blank one
        colors = im.getcolors(1 << 20)          # None: more than a million colours
        assert im.width == 1280 and (colors is None or len(colors) > 50)
