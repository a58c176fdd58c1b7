"""The BentoML service end to end: a real server on loopback, the micro model promoted and its index built.
(Failures, metrics, logs, the Bento and served rankings against the evaluation: tests/test_service_ops.py.)"""

import base64
import hashlib
import io
import json
import os
import re
import shutil
import time

import numpy as np
import pytest
from playwright.sync_api import Page, expect

from model_code.feedback import FeedbackStore, token_identity
from tests._png import pixels
from tests._serving import Server, error_of, kill, multipart, prepare
from tests.conftest import flip_last_byte


@pytest.fixture(scope="module")
def served(tmp_path_factory, micro_base, tiny_synthetic):
    """A model store with the micro model in production, its index, and the environment to serve them."""
    home = tmp_path_factory.mktemp("serve")
    env, version, image = prepare(home, micro_base, tiny_synthetic)
    return env, version, image, home


@pytest.fixture(scope="module")
def server(served):
    env, version, image, home = served
    s = Server({**env, "CIRCOT_MAX_IMAGE_BYTES": "50000", "CIRCOT_MAX_IMAGE_PIXELS": "20000",
                "CIRCOT_MAX_IMAGES": "70"}, home / "open.log")
    s.wait()
    yield s
    s.stop()


def test_search_in_both_modes_with_reasoning_and_thumbnails(server, served):
    from PIL import Image

    from model_code.data import read_dataset

    _, version, image, home = served
    code, body, headers = server.call("POST", "/search", {"modification": "make the star red", "k": 4, "mode": "cot"},
                                      {"image": ("ref.png", image)})
    assert code == 200, body
    answer = json.loads(body)
    assert answer["model_version"] == version and answer["mode"] == "cot" and len(answer["results"]) == 4
    assert answer["dataset"] == "synthetic" and headers["x-circot-dataset"] == "synthetic"  # said in every answer
    assert set(answer["reasoning"]) == {"caption", "reasoning", "conclusion", "raw", "error"}
    assert answer["reasoning"]["error"] is None and answer["reasoning"]["caption"]  # decoding keeps the format
    assert {"reasoning", "search", "model_batch"} <= set(answer["timings"]) and answer["timings"]["batch_size"] == 1
    scores = [h["score"] for h in answer["results"]]
    assert scores == sorted(scores, reverse=True)
    reference = sorted((home / "cir-shapes" / "images" / "test").glob("*.png"))[0].stem
    assert answer["excluded"] == [reference] and reference not in {h["image_id"] for h in answer["results"]}
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
    code, page = server.request("GET", "/ui/")
    assert code == 200 and b"<form id=\"query\"" in page


def test_the_reference_is_left_out_by_content_and_by_the_id_given(server, served):
    """The gallery image with the upload's bytes never comes back (as the evaluation leaves it out);
    nor does the reference_id given; a k that would need it is refused, and so is an id not in the gallery."""
    home = served[3]
    files = sorted((home / "cir-shapes" / "images" / "test").glob("*.png"))
    n = len(files)
    code, body = server.search(files[3].read_bytes(), mode="no_cot", k=n - 1)
    ids = [h["image_id"] for h in json.loads(body)["results"]]
    assert code == 200 and len(ids) == n - 1 and files[3].stem not in ids
    assert json.loads(body)["excluded"] == [files[3].stem]
    code, body = server.search(files[3].read_bytes(), mode="no_cot", k=n - 2, reference_id=files[5].stem)
    answer = json.loads(body)
    assert answer["excluded"] == sorted([files[3].stem, files[5].stem])
    assert not {files[3].stem, files[5].stem} & {h["image_id"] for h in answer["results"]}
    code, body = server.search(files[3].read_bytes(), mode="no_cot", k=n)
    assert code == 400 and f"k must be from 1 to {n - 1}" in error_of(body)
    code, body = server.search(files[3].read_bytes(), mode="no_cot", k=2, reference_id="not-in-the-gallery")
    assert code == 400 and "reference_id 'not-in-the-gallery' is not an image of the synthetic" in error_of(body)
    # the same picture in another file: saved as JPEG, or a few pixels larger, is still the reference
    import io

    from PIL import Image

    with Image.open(files[3]) as im:
        im = im.convert("RGB")
    for variant, fmt in ((im, "JPEG"), (im.resize((im.width + 6, im.height + 6), Image.BICUBIC), "PNG")):
        buf = io.BytesIO()
        variant.save(buf, fmt, quality=95)
        assert buf.getvalue() != files[3].read_bytes()
        code, body = server.search(buf.getvalue(), mode="no_cot", k=n - 1)
        answer = json.loads(body)
        assert code == 200 and answer["excluded"] == [files[3].stem], fmt
        assert files[3].stem not in {h["image_id"] for h in answer["results"]}


def test_embed_image_takes_any_allowed_number_of_images(server, served):
    from PIL import Image

    home = served[3]
    files = sorted((home / "cir-shapes" / "images" / "test").glob("*.png"))
    images = [(f"{i}.png", files[i % len(files)].read_bytes()) for i in range(64)]   # two encoder batches
    code, body = server.request("POST", "/embed_image", files={"images": images})
    vectors = json.loads(body) if code == 200 else body
    assert code == 200 and len(vectors) == 64 and all(len(v) == 64 for v in vectors), vectors
    same = lambda a, b: np.allclose(a, b, atol=1e-5)  # noqa: E731
    assert same(vectors[0], vectors[len(files)])   # the same image, in another batch: the same embedding
    code, body = server.request("POST", "/embed_image", files={"images": images[:1]})
    assert code == 200 and same(json.loads(body)[0], vectors[0])
    code, body = server.request("POST", "/embed_image", files={"images": images + images[:7]})
    assert code == 413 and "71 images; at most 70" in error_of(body)
    big = io.BytesIO()
    Image.new("RGB", (200, 200)).save(big, format="PNG")
    code, body = server.request("POST", "/embed_image", files={"images": images[:2] + [("big.png", big.getvalue())]})
    assert code == 413 and error_of(body).startswith("image 3 of 3: the image has 200x200 pixels")


def test_the_guard_hands_the_app_the_form_it_checked_byte_for_byte():
    """A form larger than the guard holds in memory (the rest goes to a temporary file) reaches the app
    whole and in order, however the client's chunks fell; a refused one never reaches it; a client gone
    while its body was read is not answered."""
    import asyncio

    from model_code.settings import ServiceSettings
    from serving.guard import SPOOL_BYTES, Guard

    got = []

    async def app(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message["body"], message["more_body"]
        got.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    class Ready:
        def front_reason(self):
            return None

    guard = Guard(app, ServiceSettings(api_token=None, max_image_bytes=4 * SPOOL_BYTES), {"service": Ready()})
    boundary = "unit-" + "b" * 40
    form = multipart({"modification": "make it red"}, {"image": ("a.png", os.urandom(3 * SPOOL_BYTES))}, boundary)

    def post(body: bytes, gone: bool = False):
        chunks = [body[i: i + 65_537] for i in range(0, len(body), 65_537)]
        messages = [{"type": "http.request", "body": c, "more_body": gone or i < len(chunks) - 1}
                    for i, c in enumerate(chunks)]
        sent = []

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/search",
                 "headers": [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]}
        asyncio.run(guard(scope, receive, send))
        return (sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])) if sent else None

    assert post(form) == (200, b"{}") and got == [form]
    code, body = post(form.replace(b'name="image"; filename="a.png"', b'name="image"'))
    assert code == 400 and error_of(body).startswith("image must be an uploaded file") and len(got) == 1
    assert post(form[: SPOOL_BYTES], gone=True) is None and len(got) == 1


def test_a_full_traffic_class_is_refused_at_once_with_retry_after_and_the_other_class_goes_on():
    """serving/traffic.py: a lane holds at most its limit of calls; one more is refused at once with 503,
    a sentence naming its class and a Retry-After of about how long its calls hold their place (a moving
    average of the calls answered); a place freed takes the next call; the other class is not affected."""
    import asyncio

    from serving.link import ApiError
    from serving.observability import metrics
    from serving.traffic import Lane

    refusals = metrics().queue_refused.labels("cot")

    async def run():
        cot, embedding = Lane("cot", 2, 4.5), Lane("embedding", 1, 1.0)
        release = asyncio.Event()

        async def hold(lane):
            async with lane.admit():
                await release.wait()

        held = [asyncio.ensure_future(hold(cot)) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert cot.held == 2 and metrics().queue_depth.labels("cot")._value.get() == 2
        before = refusals._value.get()
        with pytest.raises(ApiError) as refused:
            async with cot.admit():
                raise AssertionError("admitted past the limit")
        assert refused.value.status == 503 and refused.value.retry_after == 5   # ceil(4.5)
        assert str(refused.value) == ("the CoT queue is full: 2 calls of this kind are being answered or waiting (at "
                                      "most 2, CIRCOT_COT_QUEUE); try again in 5 s")
        response = refused.value.response()
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert refusals._value.get() == before + 1
        async with embedding.admit():   # the other class has its own room
            assert embedding.held == 1
        release.set()
        await asyncio.gather(*held)
        assert cot.held == 0 and embedding.held == 0
        # the two calls held their place ~0.01 s: the estimate moved from 4.5 s toward it
        assert 2.0 < cot.typical_s < 3.0 and cot.retry_after() == 3
        with pytest.raises(ValueError):
            async with cot.admit():     # a failed call frees its place and is not timed
                raise ValueError("the model is away")
        assert cot.held == 0 and 2.0 < cot.typical_s < 3.0
        for _ in range(40):
            async with cot.admit():
                pass
        assert cot.retry_after() == 1    # at least a second

    asyncio.run(run())


def malformed_requests(server, image: bytes, gallery_id: str) -> list[tuple[str, str, str, object, dict, int, str]]:
    """Every kind of malformed request the API gets, as (what, method, path, body, headers, status, a part of
    the error); docs/serving.md lists them. The test server takes images of at most 50,000 bytes and 20,000
    pixels and 70 images a call: a /search body is at most 50,000 + 4,096 + 65,536 = 119,632 bytes."""
    from PIL import Image

    b = "malformed-0-boundary"
    form = {"Content-Type": f"multipart/form-data; boundary={b}"}
    fields = {"modification": "make the star red", "k": 3, "mode": "no_cot"}

    def search(fields_=None, files=None, drop=()):   # a /search form: the good one, with some fields changed
        given = {k: v for k, v in {**fields, **(fields_ or {})}.items() if k not in drop}
        return multipart(given, {"image": ("ref.png", image)} if files is None else files, b)

    def png(size, pixels=None):
        out = io.BytesIO()
        (Image.frombytes("RGB", size, pixels) if pixels else Image.new("RGB", size, (1, 2, 3))).save(out, "PNG")
        return out.getvalue()

    noisy = png((150, 150), os.urandom(150 * 150 * 3))   # > 50,000 bytes, within the body's limit
    whole = search()
    opened = f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'.encode()
    data_uri = "data:image/png;base64," + base64.b64encode(image).decode()
    not_file = "image must be an uploaded file"
    cases = [
        # the media type: /search and /embed_image take multipart/form-data, /feedback application/json
        ("no Content-Type, no body", "POST", "/search", None, {}, 415, "has no Content-Type"),
        ("no Content-Type, a form", "POST", "/search", whole, {}, 415, "has no Content-Type"),
        ("text/plain", "POST", "/search", b"make the star red", {"Content-Type": "text/plain"}, 415,
         "not 'text/plain'"),
        ("JSON garbage", "POST", "/search", b'{"image": ', {"Content-Type": "application/json"}, 415,
         "takes multipart/form-data"),
        ("JSON naming a URL", "POST", "/search", json.dumps({"image": "http://example.com/a.png", "modification": "m"})
         .encode(), {"Content-Type": "application/json"}, 415, "takes multipart/form-data"),
        ("urlencoded", "POST", "/search", b"image=http%3A%2F%2Fexample.com%2Fa.png&modification=m",
         {"Content-Type": "application/x-www-form-urlencoded"}, 415, "takes multipart/form-data"),
        ("multipart/mixed", "POST", "/search", whole, {"Content-Type": f"multipart/mixed; boundary={b}"}, 415,
         "takes multipart/form-data"),
        # the multipart structure
        ("multipart without a boundary", "POST", "/search", whole, {"Content-Type": "multipart/form-data"}, 400,
         "has no boundary"),
        ("an empty boundary", "POST", "/search", whole, {"Content-Type": "multipart/form-data; boundary="}, 400,
         "has no boundary"),
        ("an empty body", "POST", "/search", b"", form, 400, "the multipart body is empty"),
        ("a body cut short", "POST", "/search", whole[: len(whole) // 2], form, 400, "before its closing boundary"),
        ("no closing boundary", "POST", "/search", whole[: whole.rindex(f"--{b}--".encode())], form, 400,
         "before its closing boundary"),
        ("bytes that do not follow the boundary", "POST", "/search", b"this is not a form", form, 400,
         "the multipart body is malformed"),
        ("a part without a name", "POST", "/search",
         f"--{b}\r\nContent-Disposition: form-data\r\n\r\nx\r\n".encode() + whole, form, 400, "has no name"),
        ("over 1000 parts", "POST", "/search", multipart({**fields, **{f"x{i}": 1 for i in range(1000)}},
                                                         {"image": ("ref.png", image)}, b), form, 413,
         "over 1000 parts"),
        ("a text field over 64 KiB", "POST", "/search", search({"modification": "x" * 70_000}), form, 413,
         "'modification' is over 65536 bytes"),
        ("a body over the limit", "POST", "/search", search(files={"image": ("big.png", os.urandom(200_000))}), form,
         413, "the search body is over 119632 bytes"),
        ("a body over the limit, chunked", "POST", "/search", [opened] + [bytes(50_000)] * 4, form, 413,
         "the search body is over 119632 bytes"),
        # the image: an uploaded file, never a text value (a URL is not fetched, a path not read)
        ("image a text", "POST", "/search", search({"image": "ref.png"}, {}), form, 400, not_file),
        ("image an http URL", "POST", "/search", search({"image": "http://example.com/ref.png"}, {}), form, 400,
         not_file),
        ("image a loopback URL", "POST", "/search",
         search({"image": f"{server.url}/ui/images/synthetic/{gallery_id}"}, {}), form, 400, not_file),
        ("image a file:// path", "POST", "/search", search({"image": "file:///etc/passwd"}, {}), form, 400, not_file),
        ("image a data: URI", "POST", "/search", search({"image": data_uri}, {}), form, 400, not_file),
        ("image missing", "POST", "/search", search(files={}), form, 400, "image: Field required"),
        ("image random bytes", "POST", "/search", search(files={"image": ("a.png", os.urandom(500))}), form, 400,
         "not a readable image"),
        ("image empty", "POST", "/search", search(files={"image": ("a.png", b"")}), form, 400, "not a readable image"),
        ("image a truncated PNG", "POST", "/search", search(files={"image": ("a.png", image[: len(image) // 2])}),
         form, 400, "not a readable image"),
        ("image a text file named .png", "POST", "/search",
         search(files={"image": ("a.png", b"make the star red\n")}), form, 400, "not a readable image"),
        ("image over CIRCOT_MAX_IMAGE_BYTES", "POST", "/search", search(files={"image": ("a.png", noisy)}), form,
         413, "bytes; at most 50000"),
        ("image over CIRCOT_MAX_IMAGE_PIXELS", "POST", "/search", search(files={"image": ("a.png", png((200, 200)))}),
         form, 413, "200x200 pixels"),
        # the other fields
        ("modification missing", "POST", "/search", search(drop=("modification",)), form, 400,
         "modification: Field required"),
        ("modification empty", "POST", "/search", search({"modification": ""}), form, 400,
         "modification text is empty"),
        ("modification spaces", "POST", "/search", search({"modification": " \t "}), form, 400,
         "modification text is empty"),
        ("modification invisible", "POST", "/search", search({"modification": "\u200b\u2060\ufeff\u00ad"}), form, 400,
         "modification text is empty"),
        ("modification too long", "POST", "/search", search({"modification": "x" * 1001}), form, 400, "at most 1000"),
        ("k 0", "POST", "/search", search({"k": 0}), form, 400, "k must be from 1"),
        ("k negative", "POST", "/search", search({"k": -3}), form, 400, "k must be from 1"),
        ("k not a number", "POST", "/search", search({"k": "many"}), form, 400, "k: "),
        ("k a fraction", "POST", "/search", search({"k": 2.5}), form, 400, "k: "),
        ("k huge", "POST", "/search", search({"k": 10**30}), form, 400, "k must be from 1"),
        ("mode unknown", "POST", "/search", search({"mode": "both"}), form, 400, "mode must be one of cot, no_cot"),
        ("dataset unknown", "POST", "/search", search({"dataset": "cirr"}), form, 404, "serves synthetic, not 'cirr'"),
        ("reference_id unknown", "POST", "/search", search({"reference_id": "not-in-the-gallery"}), form, 400,
         "reference_id 'not-in-the-gallery' is not an image of the synthetic gallery"),
        ("GET /search", "GET", "/search", None, {}, 405, "Method Not Allowed"),
        # /embed_image
        ("embed: no Content-Type", "POST", "/embed_image", multipart({}, {"images": ("a.png", image)}, b), {}, 415,
         "has no Content-Type"),
        ("embed: JSON naming a URL", "POST", "/embed_image", b'{"images": ["http://example.com/a.png"]}',
         {"Content-Type": "application/json"}, 415, "takes multipart/form-data"),
        ("embed: multipart without a boundary", "POST", "/embed_image", multipart({}, {"images": ("a.png", image)}, b),
         {"Content-Type": "multipart/form-data"}, 400, "has no boundary"),
        ("embed: images a URL", "POST", "/embed_image", multipart({"images": "http://example.com/a.png"}, {}, b), form,
         400, "images must be an uploaded file"),
        ("embed: images missing", "POST", "/embed_image", multipart({"x": 1}, {}, b), form, 400,
         "images: Field required"),
        ("embed: an image of random bytes", "POST", "/embed_image",
         multipart({}, {"images": [("a.png", image), ("b.png", os.urandom(300))]}, b), form, 400,
         "image 2 of 2: the upload is not a readable image"),
        # /feedback
        ("feedback: no Content-Type", "POST", "/feedback", b'{"query_id": "x", "none_of_these": true}', {}, 415,
         "POST /feedback takes application/json; the request has no Content-Type"),
        ("feedback: text/plain", "POST", "/feedback", b'{"query_id": "x", "none_of_these": true}',
         {"Content-Type": "text/plain"}, 415, "takes application/json, not 'text/plain'"),
        ("feedback: a form", "POST", "/feedback", multipart({"query_id": "x"}, {}, b), form, 415,
         "takes application/json"),
        ("feedback: JSON garbage", "POST", "/feedback", b'{"query_id": ', {"Content-Type": "application/json"}, 400,
         "the request's fields are not right"),
        ("feedback: JSON not an object", "POST", "/feedback", b"[1, 2]", {"Content-Type": "application/json"}, 400,
         "the request's fields are not right"),
        ("feedback: a body over 16 KiB", "POST", "/feedback", b"{" + b" " * 20_000 + b"}",
         {"Content-Type": "application/json"}, 413, "the feedback body is over 16384 bytes"),
        # /ui/images
        *[(f"size {size}", "GET", f"/ui/images/synthetic/{gallery_id}?size={size}", None, {}, 400,
           f"size must be a whole number of pixels from 1 to 1024, not '{size}'")
          for size in ("-5", "0", "100000", "1025", "abc", "2.5", "")],
        ("an unknown dataset's image", "GET", f"/ui/images/cirr/{gallery_id}", None, {}, 404,
         "serves synthetic, not cirr"),
        ("an unknown image", "GET", "/ui/images/synthetic/no-such-image", None, {}, 404,
         "no image 'no-such-image' in the synthetic gallery"),
        ("an unknown path", "GET", "/no/such/page", None, {}, 404, "Not Found"),
    ]
    return cases


def test_every_malformed_request_is_a_4xx_in_one_shape_and_the_service_stays_healthy(server, served):
    """Each malformed request gets its 4xx and {"error": "..."}, never a 500, and nothing BentoML would read
    as a URL to fetch reaches it; the service answers queries afterwards and its log has no traceback."""
    _, _, image, home = served
    files = sorted((home / "cir-shapes" / "images" / "test").glob("*.png"))
    cases = malformed_requests(server, image, files[1].stem)
    assert len(cases) >= 34 and len({c[0] for c in cases}) == len(cases)
    wrong = []
    for what, method, path, body, headers, status, message in cases:
        code, answer = server.raw(method, path, body, headers)
        try:
            shaped = error_of(answer)
        except (AssertionError, ValueError):
            shaped = None
        if code != status or shaped is None or message not in shaped:
            wrong.append(f"{what}: {code} {answer[:200]!r} (expected {status} with {message!r})")
    assert not wrong, "\n".join(wrong)
    gone = files[-1]
    kept = gone.read_bytes()
    gone.unlink()  # the index names it, the disk no longer has it
    try:
        code, body = server.request("GET", f"/ui/images/synthetic/{gone.stem}")
        assert code == 404 and "cannot be read on this server" in error_of(body)
    finally:
        gone.write_bytes(kept)
    # healthy: ready, and a good query (through the same checks, as multipart) is answered
    assert server.request("GET", "/readyz")[0] == 200 and server.proc.poll() is None
    code, body = server.raw("POST", "/search", multipart({"modification": "make the star red", "k": 3, "mode": "no_cot",
                                                          "reference_id": files[5].stem},
                                                         {"image": ("ref.png", files[3].read_bytes())}, "good"),
                            {"Content-Type": "multipart/form-data; boundary=good"})
    assert code == 200 and len(json.loads(body)["results"]) == 3, body[:300]
    assert json.loads(body)["excluded"] == sorted([files[3].stem, files[5].stem])
    code, png = server.request("GET", f"/ui/images/synthetic/{files[1].stem}?size=1024")
    assert code == 200 and pixels(png).shape == (64, 64, 3)
    code, body = server.request("POST", "/embed_image", files={"images": [("a.png", image)]})
    assert code == 200 and len(json.loads(body)) == 1
    log = server.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log   # refusals are WARNING lines, without tracebacks
    assert "CIRCOT_API_TOKEN is not set: the API is open to anyone" in log   # no token: it says so at start
    assert "WARNING circot.access: POST /search 413" in log and "GET /no/such/page 404" in log
    assert "WARNING circot.access: POST /search 400" in log and "image must be an uploaded file" in log


def test_a_token_guards_every_call_but_the_page_and_the_health_endpoints(served):
    """Self-contained (its own server; nothing read from another test's server), so it passes in any order."""
    env, _, image, home = served
    s = Server({**env, "CIRCOT_API_TOKEN": "s3cret"}, home / "auth.log")

    def feedback_counts() -> dict[str, float]:
        code, text = s.request("GET", "/metrics", headers={"Authorization": "Bearer s3cret"})
        assert code == 200
        return {k: float(v) for k, v in re.findall(r'circot_feedback_total\{outcome="(\w+)"\} (\S+)', text.decode())}

    try:
        s.wait()
        # the metrics files live under BENTOML_HOME, which other servers of this module share: what this
        # server counted is what changed while it ran
        counted = feedback_counts()
        assert s.search(image)[0] == 401
        assert s.search(image, headers={"Authorization": "Bearer wrong"})[0] == 401
        code, body = s.search(image, mode="no_cot", headers={"Authorization": "Bearer s3cret"})
        assert code == 200 and json.loads(body)["results"]
        feedback = {"query_id": json.loads(body)["query_id"], "none_of_these": True}
        first = json.loads(body)["results"][0]["image_id"]
        code, body = s.post_json("/feedback", feedback)
        assert code == 401 and "bearer token" in error_of(body)
        code, body = s.post_json("/feedback", feedback, {"Authorization": "Bearer s3cret"})
        assert code == 200 and json.loads(body)["token"] == token_identity("s3cret") != "anonymous"
        store = FeedbackStore(home / "artifacts" / "feedback" / "synthetic", "synthetic")
        assert store.query(feedback["query_id"]).token == token_identity("s3cret")
        assert [e.token for e in store.events() if e.query_id == feedback["query_id"]] == [token_identity("s3cret")]
        code, body = s.post_json("/feedback", {**feedback, "none_of_these": False, "chosen": first},
                                 {"Authorization": "Bearer s3cret"})
        assert code == 409 and "answered query" in error_of(body)
        assert s.post_json("/feedback", b"{" + b" " * 20_000 + b"}", {"Authorization": "Bearer s3cret"})[0] == 413
        counts = feedback_counts()   # counted by outcome
        grew = {k: v - counted.get(k, 0.0) for k, v in counts.items() if v != counted.get(k, 0.0)}
        assert grew == {"accepted": 1, "conflict": 1, "too_large": 1}, (counted, counts)
        for path in ("/ui/images/synthetic/x", "/metrics", "/docs.json", "/schema.json", "/"):
            code, body = s.request("GET", path)
            assert code == 401 and "bearer token" in error_of(body), path
        assert s.request("GET", "/metrics", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert s.request("GET", "/docs.json", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert [s.request("GET", p)[0] for p in ("/livez", "/healthz", "/readyz", "/ui/")] == [200, 200, 200, 200]
    finally:
        s.stop()
    assert "open to anyone" not in (home / "auth.log").read_text()


def test_without_a_production_model_it_is_alive_but_not_ready(served):
    env, _, image, home = served
    s = Server({**env, "BENTOML_HOME": str(home / "empty-store")}, home / "empty.log")
    try:
        s.wait(200, "/livez")
        s.wait(503, "/readyz")
        code, body, headers = s.call("POST", "/search", {"modification": "make it red"}, {"image": ("a.png", image)})
        assert code == 503 and "no production model of synthetic" in error_of(body) and "make run" in error_of(body)
        assert headers["retry-after"] == "5"
        code, body = s.request("GET", "/readyz")
        assert code == 503 and "no production model of synthetic" in error_of(body)
    finally:
        s.stop()
    assert "not ready: no production model of synthetic" in (home / "empty.log").read_text()


def test_a_bit_flipped_model_is_refused_at_start_and_readyz_names_the_file(served):
    """The encoder verifies the stored model by content before it serves it: weights damaged without a
    size change (which would load, and answer wrong) keep the service unready, saying which file."""
    env, version, image, home = served
    store = home / "flipped-store"
    shutil.copytree(home / "bentoml", store)
    flip_last_byte(store / "models" / "cir-cot" / version / "model" / "adapter" / "adapter_model.safetensors")
    s = Server({**env, "BENTOML_HOME": str(store)}, home / "flipped.log")
    try:
        s.wait(200, "/livez")
        deadline, why = time.monotonic() + 120, ""
        while time.monotonic() < deadline and "damaged" not in why:
            code, body = s.request("GET", "/readyz")
            assert code == 503, body
            why = error_of(body)
            time.sleep(0.5)
        assert re.search(r"cannot load the model: ModelFolderError: the model at .* is damaged: "
                         r"adapter/adapter_model\.safetensors differs from what was saved \(md5\)", why), why
        code, body, _ = s.call("POST", "/search", {"modification": "make it red"}, {"image": ("a.png", image)})
        assert code == 503 and "adapter_model.safetensors differs" in error_of(body)
    finally:
        s.stop()
    assert "encoder not ready: ModelFolderError" in (home / "flipped.log").read_text()


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
    searches = []
    page.on("request", lambda r: searches.append(r.url) if r.url.endswith("/search") else None)
    page.goto(server.url + "/ui/")
    page.set_input_files("#image", reference)
    expect(page.locator("#preview img")).to_have_js_property("naturalWidth", side)   # the reference is shown
    page.fill("#modification", "make the star red")
    page.fill("#k", "3")
    page.click("#submit")
    page.locator("#query").dispatch_event("submit")     # a second click while the first search runs
    expect(page.locator("#status")).to_contain_text(f"model {version} · synthetic · cot · ", timeout=120_000)
    status = page.locator("#status").inner_text()
    assert "in a batch of 1" in status and "batch_size" not in status and "reasoning " in status
    # the chain, each section editable in place, as the model wrote it (nothing marked changed)
    expect(page.locator("#chain label")).to_have_text(["caption", "reasoning", "conclusion"])
    for part in ("caption", "reasoning", "conclusion"):
        expect(page.locator(f"#chain-{part}")).to_have_value(answer["reasoning"][part])
    expect(page.locator("#chain textarea.changed")).to_have_count(0)
    thumbnails = page.locator("#results figure img")
    expect(thumbnails).to_have_count(3)
    for thumbnail, hit in zip(thumbnails.all(), answer["results"]):   # the service's ranking, each image loaded
        expect(thumbnail).to_have_attribute("alt", hit["image_id"])
        expect(thumbnail).to_have_js_property("naturalWidth", min(side, 128))
    assert len(searches) == 1   # the second click was ignored: one search, one copy of the answer
    expect(page.locator("#submit")).to_be_enabled()
    shot = tmp_path / "ui-search.png"
    page.screenshot(path=shot)
    with Image.open(shot) as im:   # a whole picture of a page, not a blank one
        colors = im.getcolors(1 << 20)          # None: more than a million colours
        assert im.width == 1280 and (colors is None or len(colors) > 50)


def test_answers_carry_a_query_id_and_feedback_on_them_is_kept_once(server, served):
    """Each /search answer is recorded (what was shown, the reference's bytes, the chain) under its
    query_id; POST /feedback keeps one answer per query and token and refuses the rest clearly."""
    _, version, image, home = served
    store = FeedbackStore(home / "artifacts" / "feedback" / "synthetic", "synthetic")
    code, body = server.search(image, "make the star red", k=4, mode="cot")
    answer = json.loads(body)
    assert code == 200 and re.fullmatch(r"[0-9a-f]{32}", answer["query_id"]), body
    shown = store.query(answer["query_id"])
    ids = [h["image_id"] for h in answer["results"]]
    assert shown.shown == ids and shown.scores == [h["score"] for h in answer["results"]]
    assert (shown.model_version, shown.mode, shown.modification, shown.token) == (version, "cot", "make the star red",
                                                                                   "anonymous")
    assert shown.chain == answer["reasoning"] and shown.reference_hash == hashlib.md5(image).hexdigest()
    assert (store.root / shown.reference_file).read_bytes() == image and shown.reference_file.endswith(".png")
    qid = answer["query_id"]
    code, body = server.post_json("/feedback", {"query_id": qid, "chosen": ids[0], "rejected": ids[1:3]})
    assert code == 200 and json.loads(body)["stored"] is True, body
    assert json.loads(body)["token"] == "anonymous" and json.loads(body)["rejected"] == sorted(ids[1:3])
    code, body = server.post_json("/feedback", {"query_id": qid, "chosen": ids[0], "rejected": ids[2:0:-1]})
    assert code == 200 and json.loads(body)["stored"] is False   # the same answer again: kept once
    events = [e for e in store.events() if e.query_id == qid]
    assert len(events) == 1 and events[0].chosen == ids[0] and events[0].rejected == sorted(ids[1:3])
    other = json.loads(server.search(image, k=3, mode="no_cot")[1])["query_id"]
    expired = json.loads(server.search(image, k=3, mode="no_cot")[1])["query_id"]
    path = store.root / "queries" / f"{expired}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "time": time.time() - 200 * 3600}))  # a week ago
    refusals = [
        ({"query_id": qid, "chosen": ids[1]}, 409, "already answered query"),
        ({"query_id": other, "chosen": "no-such-image"}, 400, "not shown for query"),
        ({"query_id": other}, 400, "say something"),
        ({"query_id": "0" * 32, "none_of_these": True}, 404, "unknown query"),
        ({"query_id": "../../etc", "none_of_these": True}, 404, "not a query id"),
        ({"query_id": expired, "none_of_these": True}, 410, "has expired"),
        ({"chosen": ids[0]}, 400, "query_id: Field required"),
        ({"query_id": other, "rejected": [f"x{i:05d}" for i in range(3000)]}, 413, "over 16384 bytes"),
    ]
    for payload, status, message in refusals:
        code, body = server.post_json("/feedback", payload)
        assert code == status and message in error_of(body), (payload.get("query_id"), code, body[:300])
    assert [e.query_id for e in store.events()].count(other) == 0


def test_a_corrected_search_ranks_with_the_given_chain_in_one_forward_pass_and_is_kept_as_a_correction(server,
                                                                                                       served):
    """/search with ``chain`` (and the ``query_id`` it corrects): the chain is teacher-forced before
    <emb> (the model's own chain given back ranks as its CoT search did), the answer says what changed,
    and the correction is kept with the model's chain and the person's; a bad chain is a 400."""
    _, _, image, home = served
    store = FeedbackStore(home / "artifacts" / "feedback" / "synthetic", "synthetic")
    text = "make the star red"
    code, body = server.search(image, text, k=5, mode="cot")
    assert code == 200, body
    first = json.loads(body)
    model = {s: first["reasoning"][s] for s in ("caption", "reasoning", "conclusion")}
    assert first["reasoning"]["error"] is None and first["correction"] is None

    import torch

    from model_code.chain import CoT
    from model_code.model.cir_cot import CirCoTModel
    from model_code.retrieval import embed_with_chains, open_image

    served_model = CirCoTModel.load(home / "model")
    gallery = sorted((home / "cir-shapes" / "images" / "test").glob("*.png"))
    vectors = served_model.embed_images(gallery)

    def teacher_forced(chain: dict) -> tuple[list[str], list[float]]:
        """The top 5 of the chain teacher-forced, computed here (the reference left out by content)."""
        with torch.no_grad():
            q = embed_with_chains(served_model, [open_image(image)], [text], [CoT(**chain)])[0]
        scores = (vectors @ q).tolist()
        order = [i for i in sorted(range(len(gallery)), key=lambda i: -scores[i])
                 if gallery[i].read_bytes() != image][:5]
        return [gallery[i].stem for i in order], [scores[i] for i in order]

    # the model's own chain, given back: nothing changed; ranked with the chain teacher-forced, no decoding
    code, body = server.search(image, text, k=5, chain=json.dumps(model), query_id=first["query_id"])
    assert code == 200, body
    same = json.loads(body)
    assert same["mode"] == "corrected" and same["correction"]["changed"] == []
    ids, scores = teacher_forced(model)
    assert [h["image_id"] for h in same["results"]] == ids
    assert np.allclose([h["score"] for h in same["results"]], scores, atol=1e-3)
    assert "reasoning" not in same["timings"] and "corrected_embedding" in same["timings"]

    # a corrected conclusion (as tagged text): ranked with it, said what changed, kept as a correction
    person = {**model, "conclusion": "bottom right: large green star"}
    tagged = "".join(f"<{s}>{v}</{s}>" for s, v in person.items())
    code, body = server.search(image, text, k=5, chain=tagged, query_id=first["query_id"])
    assert code == 200, body
    fixed = json.loads(body)
    assert {s: fixed["reasoning"][s] for s in person} == person and fixed["reasoning"]["error"] is None
    assert fixed["correction"]["corrects"] == first["query_id"] and fixed["correction"]["changed"] == ["conclusion"]
    assert [h["image_id"] for h in fixed["results"]] == teacher_forced(person)[0]
    assert {s: fixed["correction"]["model_chain"][s] for s in model} == model
    assert fixed["query_id"] not in (first["query_id"], same["query_id"])
    shown = store.query(fixed["query_id"])
    assert (shown.mode, shown.corrects, shown.shown) == ("corrected", first["query_id"],
                                                         [h["image_id"] for h in fixed["results"]])
    corrections = [e for e in store.events() if e.kind == "correction" and e.corrected_query == fixed["query_id"]]
    assert len(corrections) == 1 and corrections[0].query_id == first["query_id"]
    assert corrections[0].chain == person and corrections[0].changed == ["conclusion"]
    assert {s: corrections[0].model_chain[s] for s in model} == model
    # feedback on the corrected answer, as on any other
    picked = fixed["results"][0]["image_id"]
    code, body = server.post_json("/feedback", {"query_id": fixed["query_id"], "chosen": picked})
    assert code == 200 and json.loads(body)["stored"] is True, body
    # a chain without a query id ranks too (nothing to link it to)
    code, body = server.search(image, text, k=5, chain=json.dumps(person))
    assert code == 200 and json.loads(body)["correction"] == {"corrects": None, "changed": ["caption", "reasoning",
                                                                                          "conclusion"],
                                                             "model_chain": None}
    assert [h["image_id"] for h in json.loads(body)["results"]] == [h["image_id"] for h in fixed["results"]]

    refusals = [
        ({"chain": "<caption>a star</caption>"}, 400, "missing_section"),
        ({"chain": json.dumps({**person, "reasoning": "as in the target image"})}, 400, "leakage: target image"),
        ({"chain": json.dumps({**person, "conclusion": person["caption"]})}, 400, "conclusion_repeats_caption"),
        ({"chain": json.dumps({**person, "conclusion": "x" * 1600})}, 400, "too_long"),
        ({"chain": "{not json"}, 400, "not valid JSON"),
        ({"query_id": first["query_id"]}, 400, "give the corrected chain as 'chain'"),
        ({"chain": json.dumps(person), "query_id": "0" * 32}, 404, "unknown query"),
        ({"chain": json.dumps(person), "query_id": "../x"}, 404, "not a query id"),
    ]
    for fields, status, message in refusals:
        code, body = server.search(image, text, k=5, **fields)
        assert code == status and message in error_of(body), (fields, code, body[:300])
    code, body = server.search(image, "make the star blue", k=5, chain=json.dumps(person), query_id=first["query_id"])
    assert code == 400 and "another reference image or modification" in error_of(body)


def test_the_page_marks_results_not_this_then_sends_one_answer_from_the_keyboard(server, served, page: Page,
                                                                                  tmp_path):
    """"not this" marks a result on the page (a toggle); "this is it" sends ONE answer with the marked ids."""
    _, _, image, home = served
    reference = tmp_path / "reference.png"
    reference.write_bytes(image)
    sent = []
    page.on("request", lambda r: sent.append(r.post_data) if r.url.endswith("/feedback") else None)
    page.goto(server.url + "/ui/")
    page.set_input_files("#image", reference)
    page.fill("#modification", "make the star red")
    page.fill("#k", "4")
    page.select_option("#mode", "no_cot")
    with page.expect_response(lambda r: r.url.endswith("/search")) as searched:
        page.click("#submit")
    answer = searched.value.json()
    first, second, third, fourth = [h["image_id"] for h in answer["results"]]
    expect(page.locator("#results figure")).to_have_count(4)
    for hit in answer["results"]:   # real, labelled buttons beside each result; "not this" is a toggle
        expect(page.get_by_role("button", name=f"this is it: {hit['image_id']}")).to_be_enabled()
        expect(page.get_by_role("button", name=f"not this: {hit['image_id']}")).to_have_attribute(
            "aria-pressed", "false")
    expect(page.get_by_role("button", name="none of these")).to_be_visible()
    for marked in (fourth, second, third):     # marked from the keyboard (Space and Enter), in any order
        page.get_by_role("button", name=f"not this: {marked}").focus()
        page.keyboard.press(" " if marked != third else "Enter")
    page.get_by_role("button", name=f"not this: {third}").press("Enter")   # pressed again: unmarked
    expect(page.get_by_role("button", name=f"not this: {third}")).to_have_attribute("aria-pressed", "false")
    for marked in (second, fourth):            # visibly marked
        expect(page.get_by_role("button", name=f"not this: {marked}")).to_have_attribute("aria-pressed", "true")
        expect(page.locator(f"#results figure[data-image-id='{marked}']")).to_have_class("result rejected")
    expect(page.locator(f"#results figure[data-image-id='{third}']")).to_have_class("result")
    page.wait_for_timeout(300)
    assert sent == []                          # marking sends nothing
    page.get_by_role("button", name=f"this is it: {first}").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#feedback-status")).to_have_text(
        f"Recorded: {first} is the image you wanted; not this: {second}, {fourth}. Thank you.")
    expect(page.get_by_role("button", name="none of these")).to_be_disabled()   # one answer per query
    expect(page.get_by_role("button", name=f"not this: {third}")).to_be_disabled()
    assert [json.loads(b) for b in sent] == [{"query_id": answer["query_id"], "chosen": first,
                                              "rejected": [second, fourth]}]
    store = FeedbackStore(home / "artifacts" / "feedback" / "synthetic", "synthetic")
    events = [e for e in store.events() if e.query_id == answer["query_id"]]
    assert [(e.chosen, e.rejected, e.none_of_these, e.token) for e in events] == [
        (first, sorted([second, fourth]), False, "anonymous")]
    assert store.query(answer["query_id"]).shown == [h["image_id"] for h in answer["results"]]

    # "none of these" sends the marked ids too (a new query: the marks start again)
    with page.expect_response(lambda r: r.url.endswith("/search")) as searched:
        page.click("#submit")
    again = searched.value.json()
    expect(page.locator("#feedback-status")).to_have_text("")
    last = again["results"][-1]["image_id"]
    expect(page.locator("#results figure.rejected")).to_have_count(0)
    page.get_by_role("button", name=f"not this: {last}").click()
    page.get_by_role("button", name="none of these").click()
    expect(page.locator("#feedback-status")).to_have_text(
        f"Recorded: none of these is the image you wanted; not this: {last}. Thank you.")
    assert json.loads(sent[-1]) == {"query_id": again["query_id"], "none_of_these": True, "rejected": [last]}
    events = [e for e in store.events() if e.query_id == again["query_id"]]
    assert [(e.chosen, e.rejected, e.none_of_these) for e in events] == [(None, [last], True)]


def test_no_feedback_is_lost_or_written_twice_under_32_clients_with_a_front_worker_killed(served, tmp_path):
    """Two front workers, 32 clients posting answers, one worker killed mid-run (kill -9): every answer
    the service acknowledged is stored, each exactly once, and the ones cut off go through when retried.
    The kill is confirmed to come during the work: the worker is gone (and replaced), answers were
    acknowledged before it and after it, and at least one request it held was cut off."""
    import http.client
    import threading

    import psutil

    env, version, _, _ = served
    artifacts = tmp_path / "artifacts"
    store = FeedbackStore(artifacts / "feedback" / "synthetic", "synthetic")
    qids = [store.record_query(reference=i.to_bytes(2, "big"), suffix=".png", modification="m", model_version=version,
                               mode="no_cot", chain=None, shown=["a", "b"], scores=[1.0, 0.5], token=None)
            for i in range(1600)]
    s = Server({**env, "CIRCOT_ARTIFACTS": str(artifacts), "BENTOML_CONFIG_OPTIONS": "services.circot.workers=2"},
               tmp_path / "kill.log")
    try:
        s.wait()
        outcome: dict[str, object] = {}
        ended: list[tuple[float, object]] = []   # (when, outcome) in the order the answers came

        def client(part):
            for q in part:
                try:
                    outcome[q] = s.post_json("/feedback", {"query_id": q, "chosen": "a" if int(q, 16) % 2 else "b"})[0]
                except (OSError, http.client.HTTPException) as e:   # the connection cut by the kill
                    outcome[q] = e
                ended.append((time.monotonic(), outcome[q]))

        workers = s.workers("circot")
        assert len(workers) == 2, [p.cmdline() for p in psutil.Process(s.proc.pid).children(recursive=True)]
        threads = [threading.Thread(target=client, args=(qids[i::32],)) for i in range(32)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(ended) < 100 and time.monotonic() < deadline:   # well into the work: about 1/16 of it
            time.sleep(0.01)
        victim = workers[0]
        killed = kill(victim)
        for t in threads:
            t.join(120)
        before = [o for t, o in ended if t < killed]
        after = [o for t, o in ended if t > killed]
        cut_off = [o for o in after if o != 200]
        # the kill came during the work: answers before it and after it, and requests it held cut off
        assert 0 < sum(o == 200 for o in before) and sum(o == 200 for o in after) > 100, (len(before), len(after))
        assert cut_off, "no request was cut off: the killed worker held none"
        acknowledged = [q for q, o in outcome.items() if o == 200]
        assert len(outcome) == 1600
        stored = {e.query_id for e in store.events()}
        assert set(acknowledged) <= stored                         # nothing acknowledged is lost
        s.wait()
        deadline = time.monotonic() + 60                           # BentoML starts another worker
        while time.monotonic() < deadline and len(s.workers("circot")) < 2:
            time.sleep(0.2)
        assert len(s.workers("circot")) == 2 and victim.pid not in {p.pid for p in s.workers("circot")}
        for q in qids:                                             # the rest, retried, goes through
            if outcome[q] != 200:
                assert s.post_json("/feedback", {"query_id": q, "chosen": "a" if int(q, 16) % 2 else "b"})[0] == 200
        events = store.events()
        assert sorted(e.query_id for e in events) == sorted(qids)  # each exactly once
        assert all(e.chosen == ("a" if int(e.query_id, 16) % 2 else "b") for e in events)
    finally:
        s.stop()
