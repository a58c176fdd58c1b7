"""The CIR-CoT service: the production model of one dataset and its gallery index behind a typed API.

    .venv/bin/bentoml serve serving.service:CirCoTService --host 127.0.0.1 --port 3100   (make serve)

- ``POST /search``: a reference image (upload), a modification text, ``k`` and ``mode`` (``cot``,
  the default, or ``no_cot``) → the reasoning in its three parts (or the raw text and why it does not
  parse), the top-k gallery ids with cosine scores and image URLs, the model version and timings.
- ``POST /embed_image``: images → L2-normalised embeddings (adaptive batching).
- ``GET /images/{dataset}/{image_id}?size=N``: a gallery image as PNG (a thumbnail with ``size``).
- ``GET /ui``: a page to ask a query and see the reasoning and the result thumbnails.
- ``/livez``, ``/healthz`` (alive), ``/readyz`` (200 once the model and the index are loaded).

Settings (environment; ``model_code.settings.ServiceSettings``, listed in docs/configuration.md):
``CIRCOT_SERVE_DATASET`` (default ``synthetic``), ``BENTOML_HOME`` (the model store),
``CIRCOT_ARTIFACTS`` / ``CIRCOT_INDEX_URI`` (the gallery index), ``CIRCOT_API_TOKEN`` (when set,
every call but the health endpoints needs ``Authorization: Bearer <token>``),
``CIRCOT_MAX_IMAGE_BYTES``, ``CIRCOT_MAX_IMAGE_PIXELS``, ``CIRCOT_MAX_K``.
It imports ``model_code`` only; what it serves is what the pipeline promoted.

Two BentoML services (model composition): ``CirCoTService`` (the API, the page, auth, input checks
and the gallery index) depends on ``CirCoTEncoder`` (the model), whose three methods are
``batchable``: BentoML's dispatcher gathers the no-CoT queries, the CoT queries and the gallery
images that arrive together into one batch each (``CIRCOT_ADAPTIVE_BATCHING=0`` turns it off: the
load test's baseline). ``bentoml serve`` starts both; on Kubernetes each scales on its own.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import bentoml
import numpy as np
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from model_code.settings import ServiceSettings, load

log = logging.getLogger("circot.service")

# the settings (model_code.settings.ServiceSettings; docs/configuration.md): unusable values are
# logged and their defaults used, and /readyz reports them
SETTINGS, SETTINGS_ERRORS = load(ServiceSettings)
# adaptive batching of the encoder (CIRCOT_ADAPTIVE_BATCHING=0 turns it off: the load test's baseline)
BATCHING = SETTINGS.adaptive_batching
OPEN_PATHS = ("/livez", "/healthz", "/readyz", "/metrics", "/ui", "/ui/")
API_PATHS = ("/search", "/embed_image")
HERE = Path(__file__).resolve().parent
_running: dict = {}  # the service instance of this worker, for the page's routes


class Reasoning(BaseModel):
    caption: str | None = None
    reasoning: str | None = None
    conclusion: str | None = None
    raw: str = ""
    error: str | None = Field(default=None, description="why the raw text does not parse, when it does not")


class Hit(BaseModel):
    image_id: str
    score: float
    url: str


class SearchResponse(BaseModel):
    model_version: str
    dataset: str
    mode: str
    reasoning: Reasoning | None
    results: list[Hit]
    timings: dict[str, float]


class EncodedQuery(BaseModel):
    """A checked query on its way to the encoder: the reference image's bytes (base64) and the text."""

    image: str
    text: str


class EncodedAnswer(BaseModel):
    embedding: list[float]
    reasoning: dict | None = None
    seconds: float = Field(description="the model's time for the batch this query was in")
    batch: int = Field(description="how many queries that batch held")


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def _unb64(text: str):
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        return im.convert("RGB")


class ApiError(bentoml.exceptions.BentoMLException):
    """A refusal with its HTTP status and a sentence."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        from http import HTTPStatus

        self.error_code = HTTPStatus(status)


async def _call(method, *args):
    """A call to the encoder, retried up to twice when the pooled connection was dropped under it
    (BentoML's internal client keeps connections alive longer than the server: bentoml/BentoML#4971)."""
    import aiohttp

    for attempt in range(3):
        try:
            return await method(*args)
        except aiohttp.ClientConnectionError as e:
            if attempt == 2:
                raise ApiError(f"the encoder did not answer ({type(e).__name__}); try again", 503) from None
            log.warning("encoder connection dropped (%s); retrying", type(e).__name__)


class _Guard(BaseHTTPMiddleware):
    """The bearer token (when ``CIRCOT_API_TOKEN`` is set), then readiness: an API call before the
    model and the index are loaded gets 503 with the reason (BentoML would hide a 5xx's message)."""

    async def dispatch(self, request: Request, call_next):
        token = SETTINGS.api_token
        if token and request.url.path not in OPEN_PATHS:
            if request.headers.get("authorization", "") != f"Bearer {token}":
                return JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                                    status_code=401)
        service = _running.get("service")
        if request.url.path in API_PATHS and (service is None or not await service.__is_ready__()):
            why = service.why_not_ready() if service else "starting"
            return JSONResponse({"error": f"not ready: {why}"}, status_code=503)
        return await call_next(request)


def _page(_: Request) -> Response:
    return HTMLResponse((HERE / "ui.html").read_text())


def _image(request: Request) -> Response:
    service = _running.get("service")
    if service is None or not service.ready:
        return JSONResponse({"error": service.why_not_ready() if service else "starting"}, status_code=503)
    dataset, image_id = request.path_params["dataset"], request.path_params["image_id"]
    if dataset != service.dataset:
        return JSONResponse({"error": f"this service serves {service.dataset}, not {dataset}"}, status_code=404)
    path = service.paths.get(image_id)
    if path is None:
        return JSONResponse({"error": f"no image {image_id!r} in the {dataset} gallery"}, status_code=404)
    import io

    from PIL import Image

    try:
        size = int(request.query_params.get("size", 0))
    except ValueError:
        return JSONResponse({"error": "size must be a whole number of pixels"}, status_code=400)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size > 0:
                im.thumbnail((min(size, 1024), min(size, 1024)))
            out = io.BytesIO()
            im.save(out, format="PNG")
    except (OSError, ValueError) as e:  # the gallery's files are not where the index says, or damaged
        return JSONResponse({"error": f"image {image_id!r} cannot be read on this server ({path}: "
                                      f"{type(e).__name__})"}, status_code=404)
    return Response(out.getvalue(), media_type="image/png")


pages = Starlette(routes=[Route("/", _page), Route("/images/{dataset}/{image_id}", _image)])


@bentoml.service(name="circot-encoder", traffic={"timeout": 300})
class CirCoTEncoder:
    """The production model of ``CIRCOT_SERVE_DATASET``, loaded in the background; its methods take
    batches (inputs were checked by the front service)."""

    def __init__(self) -> None:
        self.dataset = SETTINGS.serve_dataset
        self.model = self.version = self.error = None
        threading.Thread(target=self._load, daemon=True).start()

    def _load(self) -> None:
        try:
            from model_code import registry

            prod = registry.require_production(self.dataset)
            self.model, self.version = registry.load_promoted(dataset=self.dataset), prod["version"]
            log.info("encoder: model %s of %s loaded", self.version, self.dataset)
        except Exception as e:  # noqa: BLE001 - reported through state()
            self.error = f"{type(e).__name__}: {e}"
            log.error("encoder not ready: %s", self.error)

    def __is_ready__(self) -> bool:
        return self.model is not None

    @bentoml.api
    def state(self) -> dict:
        """{"version": the loaded model's version or None, "error": why it cannot load or None}."""
        return {"version": self.version if self.model is not None else None, "error": self.error}

    def _infer(self, queries: list[EncodedQuery], mode: str) -> list[EncodedAnswer]:
        import time

        from model_code.retrieval import infer

        if self.model is None:
            raise ApiError(f"not ready: {self.error or 'still loading the model'}", 503)
        t0 = time.perf_counter()
        emb, chains = infer(self.model, [_unb64(q.image) for q in queries], [q.text for q in queries], mode)
        seconds = round(time.perf_counter() - t0, 4)
        return [EncodedAnswer(embedding=e.tolist(), reasoning=c, seconds=seconds, batch=len(queries))
                for e, c in zip(emb, chains)]

    # no-CoT queries: one forward pass for the batch (bench/load_service.py measured the settings)
    @bentoml.api(batchable=BATCHING, max_batch_size=32, max_latency_ms=1000)
    def embed_queries(self, queries: list[EncodedQuery]) -> list[EncodedAnswer]:
        return self._infer(queries, "no_cot")

    # CoT queries: decoded together, greedy and constrained (a batch of 8 decodes in little more time than one)
    @bentoml.api(batchable=BATCHING, max_batch_size=8, max_latency_ms=5000)
    def reason(self, queries: list[EncodedQuery]) -> list[EncodedAnswer]:
        return self._infer(queries, "cot")

    # 32 per batch within 1 s: measured with bench/load_service.py (docs/experiments/); at 200 ms BentoML's dispatcher
    # shed 3.5 % of the requests of 32 clients with 503s
    @bentoml.api(batchable=BATCHING, max_batch_size=32, max_latency_ms=1000)
    def embed_images(self, images: list[str]) -> list[list[float]]:
        if self.model is None:
            raise ApiError(f"not ready: {self.error or 'still loading the model'}", 503)
        return self.model.embed_images([_unb64(i) for i in images]).tolist()


@bentoml.asgi_app(pages, path="/ui")
@bentoml.service(name="circot", traffic={"timeout": 300})
class CirCoTService:
    """The API of the production model of ``CIRCOT_SERVE_DATASET``: opens the index built for it and
    waits for the encoder, in the background; ``/readyz`` answers 200 once both are there."""

    encoder = bentoml.depends(CirCoTEncoder)

    def __init__(self) -> None:
        self.dataset = SETTINGS.serve_dataset
        self.max_bytes, self.max_pixels = SETTINGS.max_image_bytes, SETTINGS.max_image_pixels
        self.max_k = SETTINGS.max_k
        self.ready = False
        # an unusable setting keeps the service from becoming ready, saying which (its default is not guessed)
        self.error = "unusable settings: " + "; ".join(SETTINGS_ERRORS) if SETTINGS_ERRORS else None
        self.index = self.version = None
        self.paths: dict[str, Path] = {}
        if not SETTINGS.api_token:
            log.warning("CIRCOT_API_TOKEN is not set: the API is open to anyone who can reach it")
        _running["service"] = self
        threading.Thread(target=self._load, daemon=True).start()

    def _load(self) -> None:
        try:
            from model_code import registry
            from model_code.index import GalleryIndex, index_uri

            prod = registry.require_production(self.dataset)
            uri = index_uri(SETTINGS.artifacts, SETTINGS.index_uri)
            index = GalleryIndex(uri, self.dataset)
            self.paths = index.paths(prod["version"])    # fails, saying so, when no index was built for it
            self.index, self.version = index, prod["version"]   # ready once the encoder has loaded the same model
            log.info("%s: index of model %s opened, %d gallery images", self.dataset, self.version, len(self.paths))
        except Exception as e:  # noqa: BLE001 - reported by /readyz and every call
            self.error = f"{type(e).__name__}: {e}"
            log.error("not ready: %s", self.error)

    async def __is_ready__(self) -> bool:
        """True once the index is open and the encoder has loaded the model it was built for."""
        if self.ready or self.index is None or self.error:
            return self.ready
        try:
            state = await self.encoder.to_async.state()
        except Exception as e:  # noqa: BLE001 - the encoder's process is still starting
            log.debug("encoder not reachable yet: %r", e)
            return False
        if state["error"]:
            self.error = f"the encoder cannot load the model: {state['error']}"
        elif state["version"] is not None and state["version"] != self.version:
            self.error = (f"the encoder loaded model {state['version']}, the index is for {self.version} "
                          "(production changed while starting): restart the service")
        elif state["version"] is not None:
            self.ready = True
            log.info("serving %s: model %s, %d gallery images", self.dataset, self.version, len(self.paths))
        return self.ready

    def why_not_ready(self) -> str:
        return self.error or "still loading the model and the index"

    def _need_ready(self) -> None:
        if not self.ready:
            raise ApiError(f"not ready: {self.why_not_ready()}", 503)

    @bentoml.api
    async def search(self, image: Path, modification: str, k: int = 10, mode: str = "cot",
               dataset: str = "") -> SearchResponse:
        """The top-k gallery images for a reference image and a modification, with the reasoning.
        ``dataset``, when given, must be the one this deployment serves (default: that one)."""
        import time

        from model_code.retrieval import MODES, QueryError, check_text, open_image, search

        self._need_ready()
        if dataset and dataset != self.dataset:
            raise ApiError(f"this service serves {self.dataset}, not {dataset!r}", 404)
        if not 1 <= k <= min(self.max_k, len(self.paths)):
            raise ApiError(f"k must be from 1 to {min(self.max_k, len(self.paths))}, not {k}", 400)
        try:
            if mode not in MODES:
                raise QueryError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
            text = check_text(modification)
            data = Path(image).read_bytes()
            open_image(data, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
            t0 = time.perf_counter()
            query = EncodedQuery(image=_b64(data), text=text)
            call = self.encoder.to_async.reason if mode == "cot" else self.encoder.to_async.embed_queries
            a = (await _call(call, [query]))[0]
            a = a if isinstance(a, EncodedAnswer) else EncodedAnswer.model_validate(a)
            t1 = time.perf_counter()
            ids, scores = search(self.index, self.version, np.asarray([a.embedding], dtype=np.float32), k)
            t2 = time.perf_counter()
        except QueryError as e:
            raise ApiError(str(e), e.status) from None
        timings = {"reasoning" if mode == "cot" else "embedding": round(t1 - t0, 4), "model_batch": a.seconds,
                   "batch_size": a.batch, "search": round(t2 - t1, 4)}
        return SearchResponse(
            model_version=self.version, dataset=self.dataset, mode=mode,
            reasoning=Reasoning(**a.reasoning) if a.reasoning else None,
            results=[Hit(image_id=i, score=round(s, 6), url=f"/ui/images/{self.dataset}/{i}")
                     for i, s in zip(ids[0], scores[0])],
            timings=timings)

    @bentoml.api
    async def embed_image(self, images: list[Path]) -> list[list[float]]:
        """Gallery embeddings (L2-normalised) of uploaded images; the encoder batches them with other requests'."""
        from model_code.retrieval import QueryError, open_image

        self._need_ready()
        try:
            data = [Path(i).read_bytes() for i in images]
            for d in data:
                open_image(d, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
        except QueryError as e:
            raise ApiError(str(e), e.status) from None
        return await _call(self.encoder.to_async.embed_images, [_b64(d) for d in data])


CirCoTService.add_asgi_middleware(_Guard)
