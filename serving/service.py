"""The CIR-CoT service: the production model of one dataset and its gallery index behind a typed API.

    .venv/bin/bentoml serve serving.service:CirCoTService --host 127.0.0.1 --port 3100   (make serve)

- ``POST /search``: a reference image (upload), a modification text, ``k`` and ``mode`` (``cot``,
  the default, or ``no_cot``) → the reasoning in its three parts (or the raw text and why it does not
  parse), the top-k gallery ids with cosine scores and image URLs, the model version and timings.
- ``POST /embed_image``: images → L2-normalised embeddings (adaptive batching).
- ``GET /images/{dataset}/{image_id}?size=N``: a gallery image as PNG (a thumbnail with ``size``).
- ``GET /ui``: a page to ask a query and see the reasoning and the result thumbnails.
- ``/livez``, ``/healthz`` (alive), ``/readyz`` (200 once the model and the index are loaded).

Settings (environment): ``CIRCOT_SERVE_DATASET`` (default ``synthetic``), ``BENTOML_HOME`` (the
model store), ``CIRCOT_ARTIFACTS`` / ``CIRCOT_INDEX_URI`` (the gallery index),
``CIRCOT_API_TOKEN`` (when set, every call but the health endpoints needs ``Authorization: Bearer
<token>``), ``CIRCOT_MAX_IMAGE_BYTES``, ``CIRCOT_MAX_IMAGE_PIXELS``, ``CIRCOT_MAX_K``.
It imports ``model_code`` only; what it serves is what the pipeline promoted.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import bentoml
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("circot.service")

# adaptive batching of /embed_image (CIRCOT_ADAPTIVE_BATCHING=0 turns it off: the load test's baseline)
BATCHING = os.environ.get("CIRCOT_ADAPTIVE_BATCHING", "1").lower() not in ("0", "false", "no")
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


class ApiError(bentoml.exceptions.BentoMLException):
    """A refusal with its HTTP status and a sentence."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        from http import HTTPStatus

        self.error_code = HTTPStatus(status)


def _int_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        log.error("%s=%r is not a whole number; using %d", name, os.environ.get(name), default)
        return default


class _Guard(BaseHTTPMiddleware):
    """The bearer token (when ``CIRCOT_API_TOKEN`` is set), then readiness: an API call before the
    model and the index are loaded gets 503 with the reason (BentoML would hide a 5xx's message)."""

    async def dispatch(self, request: Request, call_next):
        token = os.environ.get("CIRCOT_API_TOKEN")
        if token and request.url.path not in OPEN_PATHS:
            if request.headers.get("authorization", "") != f"Bearer {token}":
                return JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                                    status_code=401)
        service = _running.get("service")
        if request.url.path in API_PATHS and (service is None or not service.ready):
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


@bentoml.asgi_app(pages, path="/ui")
@bentoml.service(name="circot", traffic={"timeout": 300})
class CirCoTService:
    """Loads the production model of ``CIRCOT_SERVE_DATASET`` and the index built for it, in the
    background: ``/readyz`` answers 200 once both are loaded."""

    def __init__(self) -> None:
        self.dataset = os.environ.get("CIRCOT_SERVE_DATASET", "synthetic")
        self.max_bytes = _int_env("CIRCOT_MAX_IMAGE_BYTES", 20 * 2**20)
        self.max_pixels = _int_env("CIRCOT_MAX_IMAGE_PIXELS", 40_000_000)
        self.max_k = _int_env("CIRCOT_MAX_K", 100)
        self.ready, self.error = False, None
        self.model = self.index = self.version = None
        self.paths: dict[str, Path] = {}
        if not os.environ.get("CIRCOT_API_TOKEN"):
            log.warning("CIRCOT_API_TOKEN is not set: the API is open to anyone who can reach it")
        _running["service"] = self
        threading.Thread(target=self._load, daemon=True).start()

    def _load(self) -> None:
        try:
            from model_code import registry
            from model_code.index import GalleryIndex

            prod = registry.production(self.dataset)
            if prod is None:
                raise LookupError(f"no production model of {self.dataset} in the model store at "
                                  f"{registry.store_path()}: run `make run` (or promote one) first")
            uri = os.environ.get("CIRCOT_INDEX_URI") or str(Path(os.environ.get("CIRCOT_ARTIFACTS", "artifacts"))
                                                             / "lancedb")
            index = GalleryIndex(uri, self.dataset)
            self.paths = index.paths(prod["version"])    # fails, saying so, when no index was built for it
            self.model = registry.load_promoted(dataset=self.dataset)
            self.index, self.version = index, prod["version"]
            self.ready = True
            log.info("serving %s: model %s, %d gallery images", self.dataset, self.version, len(self.paths))
        except Exception as e:  # noqa: BLE001 - reported by /readyz and every call
            self.error = f"{type(e).__name__}: {e}"
            log.error("not ready: %s", self.error)

    def __is_ready__(self) -> bool:
        return self.ready

    def why_not_ready(self) -> str:
        return self.error or "still loading the model and the index"

    def _need_ready(self) -> None:
        if not self.ready:
            raise ApiError(f"not ready: {self.why_not_ready()}", 503)

    @bentoml.api
    def search(self, image: Path, modification: str, k: int = 10, mode: str = "cot",
               dataset: str = "synthetic") -> SearchResponse:
        """The top-k gallery images for a reference image and a modification, with the reasoning."""
        from model_code.retrieval import QueryError, answer, open_image

        self._need_ready()
        if dataset != self.dataset:
            raise ApiError(f"this service serves {self.dataset}, not {dataset!r}", 404)
        if not 1 <= k <= min(self.max_k, len(self.paths)):
            raise ApiError(f"k must be from 1 to {min(self.max_k, len(self.paths))}, not {k}", 400)
        try:
            picture = open_image(image, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
            a = answer(self.model, self.index, self.version, picture, modification, k, mode)
        except QueryError as e:
            raise ApiError(str(e), e.status) from None
        return SearchResponse(
            model_version=a.model_version, dataset=self.dataset, mode=a.mode,
            reasoning=Reasoning(**a.reasoning) if a.reasoning else None,
            results=[Hit(image_id=i, score=s, url=f"/ui/images/{self.dataset}/{i}") for i, s in zip(a.ids, a.scores)],
            timings=a.timings)

    # 32 per batch within 1 s: measured with bench/load_service.py (README); at 200 ms BentoML's dispatcher
    # shed 3.5 % of the requests of 32 clients with 503s
    @bentoml.api(batchable=BATCHING, max_batch_size=32, max_latency_ms=1000)
    def embed_image(self, images: list[Path]) -> list[list[float]]:
        """Gallery embeddings (L2-normalised) of uploaded images; requests are batched together."""
        from model_code.retrieval import QueryError, open_image

        self._need_ready()
        try:
            pictures = [open_image(i, max_bytes=self.max_bytes, max_pixels=self.max_pixels) for i in images]
        except QueryError as e:
            raise ApiError(str(e), e.status) from None
        return self.model.embed_images(pictures).tolist()


CirCoTService.add_asgi_middleware(_Guard)
