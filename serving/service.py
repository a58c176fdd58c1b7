"""The CIR-CoT service: the production model of one dataset and its gallery index behind a typed API.

    .venv/bin/bentoml serve serving.service:CirCoTService --host 127.0.0.1 --port 3100   (make serve)

- ``POST /search``: a reference image (upload), a modification text, ``k``, ``mode`` (``cot``, the
  default, or ``no_cot``) and optionally ``reference_id`` → the reasoning in its three parts (or the
  raw text and why it does not parse), the top-k gallery ids with cosine scores and image URLs, the
  dataset and model version, the ids left out as the reference, and timings. Where the dataset's
  protocol leaves the reference out of its ranking (``BenchmarkSpec.excludes_reference``), the
  gallery images with the upload's content (md5) and the ``reference_id`` given are left out, as
  the evaluation leaves them out. With ``chain`` (a person's correction of the reasoning, and the
  ``query_id`` it corrects): ranked from that chain, teacher-forced before ``<emb>`` in one forward
  pass of the encoder (no decoding), the answer saying which sections differ from the model's; the
  correction is kept as a feedback event (docs/feedback.md).
- ``POST /feedback``: a person's answer to a query (JSON: ``query_id``; ``chosen``, ``rejected`` or
  ``none_of_these``), kept with what the service showed for it (``model_code.feedback``; every
  ``/search`` answer carries its ``query_id``) under ``<artifacts>/feedback/<dataset>/``.
- ``POST /embed_image``: images → L2-normalised embeddings (split into encoder batches).
- ``GET /ui/images/{dataset}/{image_id}?size=N``: a gallery image as PNG (a thumbnail with ``size``, 1 to 1024).
- ``GET /ui/``: a page to ask a query and see the reasoning and the result thumbnails.
- ``/livez``, ``/healthz`` (alive: 200 while the encoder and the reasoner answer, even "loading"; 503
  once one of them has not answered at all for ``CIRCOT_LIVENESS_GRACE_S``, dead or stuck; before its
  first answer, ``CIRCOT_LIVENESS_STARTUP_S``), ``/readyz``
  (200 once the model and the index are loaded and the encoder and the reasoner answer; else 503 with
  the reason), ``/metrics`` (Prometheus).

Settings: ``model_code.settings.ServiceSettings`` (docs/configuration.md). The model is declared
where BentoML looks for it (``bentoml.models.BentoModel`` on the model services): ``CIRCOT_MODEL_TAG``,
else the production model of ``CIRCOT_SERVE_DATASET`` in the model store (in a Bento's image, the model
the Bento holds), so ``bentoml build`` packs it into the Bento.

Three BentoML services (model composition): ``CirCoTService`` (the API, the page, auth, input checks,
admission per traffic class and the gallery index; serving/guard.py, serving/traffic.py and
serving/link.py) depends on ``CirCoTEncoder`` (the model for embeddings: no-CoT queries and gallery
images) and on ``CirCoTReasoner`` (the same model for CoT decoding), each in its own process with
its own batches and torch threads, so that an embedding call never waits behind a CoT batch. Their
methods are ``batchable`` (``CIRCOT_ADAPTIVE_BATCHING=0`` turns it off: the load test's baseline).
``bentoml serve`` starts all three; on Kubernetes each scales on its own.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import logging
import sys
import threading
import time
from pathlib import Path

import bentoml
import numpy as np
from PIL import Image
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from model_code import registry
from model_code.benchmarks import benchmark
from model_code.chain import changed_sections
from model_code.common import bytes_md5
from model_code.feedback import FeedbackError, FeedbackStore
from model_code.index import GalleryIndex, index_uri
from model_code.retrieval import MODES, QueryError, check_chain, check_text, infer, open_image, search
from model_code.settings import ServiceSettings, load
from serving.guard import Guard, note
from serving.link import RETRY_AFTER_S, ApiError, ModelLink, on_shutdown_signal, silent_links
from serving.observability import metrics, setup_logging
from serving.traffic import Lane

log = logging.getLogger("circot.service")

# the settings (docs/configuration.md): unusable values are logged and their defaults used, and
# the service is not ready, saying which
SETTINGS, SETTINGS_ERRORS = load(ServiceSettings)
BATCHING = SETTINGS.adaptive_batching
FEEDBACK_REFUSALS = {400: "invalid", 404: "unknown_query", 409: "conflict", 410: "expired"}
IMAGE_BATCH = 32          # the encoder's largest batch of gallery images: /embed_image sends at most this many a call
THUMBNAIL_MAX = 1024      # the largest side of a thumbnail (/ui/images/...?size=N)
HERE = Path(__file__).resolve().parent
_running: dict = {}       # the front's instance in this worker, for the page's routes and the guard


def _served_model() -> tuple[str | None, str | None]:
    """``(tag, None)`` of the model to serve, or ``(None, why there is none)``."""

    try:
        if SETTINGS.model_tag:
            try:
                return str(bentoml.models.get(SETTINGS.model_tag).tag), None
            except bentoml.exceptions.NotFound:
                return None, (f"CIRCOT_MODEL_TAG={SETTINGS.model_tag} is not in the model store at "
                              f"{registry.store_path()}")
        # serving a Bento that carries its model (its image): BentoML reads the Bento's own store
        try:
            stored = bentoml.models.list(registry.MODEL_NAME)
        except bentoml.exceptions.NotFound:   # none at all
            stored = []
        own = [m for m in stored if Path(m.path).resolve().parents[1] != registry.store_path().resolve()]
        if own:
            return str(max(own, key=lambda m: m.info.creation_time).tag), None
        return registry.require_production(SETTINGS.serve_dataset)["tag"], None
    except Exception as e:  # noqa: BLE001 - reported by /readyz and every call
        return None, str(e) if isinstance(e, LookupError) else f"{type(e).__name__}: {e}"


MODEL_TAG, MODEL_ERROR = _served_model()
if MODEL_ERROR and sys.argv[1:2] == ["build"] and Path(sys.argv[0]).name in ("bentoml", "__main__.py"):
    # `bentoml build` imports this module: a Bento without its model would not serve anywhere
    raise SystemExit(f"no model to put in the Bento: {MODEL_ERROR}")
MODEL_VERSION = MODEL_TAG.split(":", 1)[1] if MODEL_TAG else None


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


class Correction(BaseModel):
    corrects: str | None = Field(description="the query whose chain was corrected (the first, when a correction "
                                             "is corrected again); null when there is none: a chain given without "
                                             "a query_id, or a correction of such a one")
    changed: list[str] = Field(description="the sections that differ from the model's chain of that query")
    model_chain: Reasoning | None = Field(default=None, description="the chain the model wrote for it")


class SearchResponse(BaseModel):
    model_version: str
    dataset: str
    mode: str = Field(description="cot, no_cot, or corrected (a chain given: teacher-forced, no decoding)")
    reasoning: Reasoning | None
    correction: Correction | None = None
    results: list[Hit]
    excluded: list[str] = Field(description="gallery ids left out as the reference (same content, or the "
                                            "reference_id given), where the dataset's protocol leaves it out")
    timings: dict[str, float | int]
    query_id: str | None = Field(default=None, description="the id to give POST /feedback for this answer (null "
                                                           "when it could not be recorded: a write error)")


class FeedbackAnswer(BaseModel):
    query_id: str
    token: str = Field(description="the identity of the bearer token that answered (a hash; 'anonymous' without auth)")
    chosen: str | None
    rejected: list[str]
    none_of_these: bool
    stored: bool = Field(description="false when the same answer was already there (it is kept once)")


class EncodedQuery(BaseModel):
    """A checked query on its way to the encoder: the reference image's bytes (base64), the text and,
    for a corrected search, the checked chain (tagged text) to teacher-force before ``<emb>``."""

    image: str
    text: str
    chain: str | None = None


class EncodedAnswer(BaseModel):
    embedding: list[float]
    reasoning: dict | None = None
    seconds: float = Field(description="the model's time for the batch this query was in")
    batch: int = Field(description="how many queries that batch held")


def _b64(data: bytes) -> str:

    return base64.b64encode(data).decode("ascii")


def _unb64(text: str):


    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        return im.convert("RGB")


def _feedback_store(dataset: str) -> FeedbackStore:
    """Where the answers and people's feedback are kept: under the artifacts root (a folder, or an
    object store through fsspec)."""
    root = SETTINGS.artifacts.rstrip("/") if "://" in SETTINGS.artifacts else Path(SETTINGS.artifacts)
    return FeedbackStore(f"{root}/feedback/{dataset}" if isinstance(root, str) else root / "feedback" / dataset,
                         dataset, ttl_s=SETTINGS.feedback_ttl_hours * 3600)


def _suffix(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as im:   # a checked image: its header names the format
        return "." + (im.format or "img").lower()


def _page(_: Request) -> Response:
    return HTMLResponse((HERE / "ui.html").read_text())


def _image(request: Request) -> Response:
    service = _running.get("service")
    if service is None or service.index is None:
        why = (service.error or "opening the gallery index") if service else "starting"
        return JSONResponse({"error": f"not ready: {why}"}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})
    dataset, image_id = request.path_params["dataset"], request.path_params["image_id"]
    if dataset != service.dataset:
        return JSONResponse({"error": f"this service serves {service.dataset}, not {dataset}"}, status_code=404)
    path = service.paths.get(image_id)
    if path is None:
        return JSONResponse({"error": f"no image {image_id!r} in the {dataset} gallery"}, status_code=404)


    size = request.query_params.get("size")
    if size is not None and not (size.isascii() and size.isdigit() and 1 <= int(size) <= THUMBNAIL_MAX):
        return JSONResponse({"error": f"size must be a whole number of pixels from 1 to {THUMBNAIL_MAX}, not "
                                      f"{size[:40]!r}"}, status_code=400)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None:
                im.thumbnail((int(size), int(size)))
            out = io.BytesIO()
            im.save(out, format="PNG")
    except (OSError, ValueError) as e:  # the gallery's files are not where the index says, or damaged
        return JSONResponse({"error": f"image {image_id!r} cannot be read on this server ({path}: "
                                      f"{type(e).__name__})"}, status_code=404)
    return Response(out.getvalue(), media_type="image/png")


pages = Starlette(routes=[Route("/", _page), Route("/images/{dataset}/{image_id}", _image)])
# BentoML's own HTTP metrics label requests by their raw URL (a series per URL a client makes up) and
# its access log would repeat ours: both off; /metrics is the guard's (serving/observability.py)
_QUIET = {"metrics": {"enabled": False}, "logging": {"access": {"enabled": False}}}


class _ModelProcess:
    """What the encoder and the reasoner share: the model, loaded in the background with this process's
    torch threads; its methods take batches (inputs were checked by the front)."""

    role = "model"          # how the logs and the front's messages call this process

    if MODEL_TAG:   # where BentoML finds the model: `bentoml build` packs it into the Bento (once for both)
        model_entry = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        setup_logging(SETTINGS.log_json)
        self.model = self.version = self.error = None
        on_shutdown_signal(lambda: None, SETTINGS.shutdown_grace_s, self.role)
        threading.Thread(target=self._load, daemon=True).start()

    def _threads(self) -> int:
        raise NotImplementedError

    def _load(self) -> None:
        try:
            if MODEL_ERROR:
                raise LookupError(MODEL_ERROR)
            import torch

            from model_code.model.cir_cot import CirCoTModel

            # the encoder and the reasoner share the machine's cores: each its own number of threads
            # (torch's default, one per core in each process, oversubscribes them; docs/serving.md)
            torch.set_num_threads(self._threads())
            entry = self.model_entry
            # verified by content (every file's md5, the version from the weights): damaged weights are
            # a reason /readyz gives, never a model that answers wrong
            self.model, self.version = CirCoTModel.load(Path(entry.path) / "model", verify=True), entry.tag.version
            log.info("%s: model %s loaded from %s (%d torch threads)", self.role, entry.tag, entry.path,
                     torch.get_num_threads())
        except Exception as e:  # noqa: BLE001 - reported through state()
            self.error = str(e) if isinstance(e, LookupError) else f"{type(e).__name__}: {e}"
            log.error("%s not ready: %s", self.role, self.error)

    def __is_ready__(self) -> bool:
        return self.model is not None

    @bentoml.api
    async def state(self) -> dict:
        """{"version": the loaded model's version or None, "error": why it cannot load or None}
        (async: answered at once while a batch runs in its thread)."""
        return {"version": self.version if self.model is not None else None, "error": self.error}

    def _need_model(self) -> None:
        if self.model is None:   # the front maps a 503 to "overloaded or restarting"
            raise bentoml.exceptions.ServiceUnavailable(f"not ready: {self.error or 'still loading the model'}")

    def _infer(self, queries: list[EncodedQuery], mode: str) -> list[EncodedAnswer]:

        self._need_model()
        t0 = time.perf_counter()
        emb, chains = infer(self.model, [_unb64(q.image) for q in queries], [q.text for q in queries], mode,
                            chains=[q.chain for q in queries])
        seconds = round(time.perf_counter() - t0, 4)
        return [EncodedAnswer(embedding=e.tolist(), reasoning=c, seconds=seconds, batch=len(queries))
                for e, c in zip(emb, chains)]


# runner_connection: the front's client replaces its connection pool after max_requests calls or max_age
# seconds, closing the calls in flight on it (each then retried: the model's work done twice); rarely
_MODEL_SERVICE = {"traffic": {"timeout": 300}, "runner_connection": {"max_requests": 1_000_000, "max_age": 86_400.0},
                  **_QUIET}
if SETTINGS.serve_gpu:   # one GPU shared by the two model processes (CUDA_VISIBLE_DEVICES set by BentoML)
    _MODEL_SERVICE["resources"] = {"gpu": 0.5}


@bentoml.service(name="circot-encoder", **_MODEL_SERVICE)
class CirCoTEncoder(_ModelProcess):
    """The model for embeddings: no-CoT queries and gallery images (one forward pass a batch)."""

    role = "encoder"

    def _threads(self) -> int:
        return SETTINGS.encoder_threads

    # no-CoT queries: one forward pass for the batch (bench/load_service.py measured the settings)
    @bentoml.api(batchable=BATCHING, max_batch_size=32, max_latency_ms=1000)
    def embed_queries(self, queries: list[EncodedQuery]) -> list[EncodedAnswer]:
        return self._infer(queries, "no_cot")

    # 32 per batch within 1 s: measured with bench/load_service.py (docs/experiments/); at 200 ms BentoML's dispatcher
    # shed 3.5 % of the requests of 32 clients with 503s
    @bentoml.api(batchable=BATCHING, max_batch_size=IMAGE_BATCH, max_latency_ms=1000)
    def embed_images(self, images: list[str]) -> list[list[float]]:
        self._need_model()
        return self.model.embed_images([_unb64(i) for i in images]).tolist()


@bentoml.service(name="circot-reasoner", **_MODEL_SERVICE)
class CirCoTReasoner(_ModelProcess):
    """The model for CoT queries: decoding, seconds a batch, in a process of its own so that no embedding
    call waits behind it (docs/serving.md, "Traffic classes")."""

    role = "reasoner"

    def _threads(self) -> int:
        return SETTINGS.reasoner_threads

    # CoT queries: decoded together, greedy and constrained (a batch of 8 decodes in little more time than one)
    @bentoml.api(batchable=BATCHING, max_batch_size=8, max_latency_ms=5000)
    def reason(self, queries: list[EncodedQuery]) -> list[EncodedAnswer]:
        return self._infer(queries, "cot")


@bentoml.asgi_app(pages, path="/ui")
@bentoml.service(name="circot", traffic={"timeout": 300}, **_QUIET)
class CirCoTService:
    """The API of the served model: opens the index built for it in the background and answers a
    class of calls once its model process (the encoder, or the reasoner for CoT) has loaded the same
    model; the guard (serving/guard.py) refuses calls until the index is open."""

    encoder = bentoml.depends(CirCoTEncoder)
    reasoner = bentoml.depends(CirCoTReasoner)

    def __init__(self) -> None:

        setup_logging(SETTINGS.log_json)
        self.dataset = SETTINGS.serve_dataset
        self.excludes_reference = benchmark(self.dataset).excludes_reference
        self.ready = False
        self._checking: asyncio.Future | None = None   # a readiness check the API calls started
        # an unusable setting keeps the service from becoming ready, saying which (its default is not guessed)
        self.error = "unusable settings: " + "; ".join(SETTINGS_ERRORS) if SETTINGS_ERRORS else None
        self.index = None
        self.version = MODEL_VERSION
        self.paths: dict[str, Path] = {}
        self.by_hash: dict[str, list[str]] = {}
        self.same_picture = None   # SamePicture of the gallery, where the protocol leaves the reference out
        # one link and one lane (admission) per traffic class: CoT to the reasoner, the rest to the encoder
        self.links = {"cot": ModelLink(self.reasoner, MODEL_VERSION, SETTINGS.encoder_timeout_s, "reasoner"),
                      "embedding": ModelLink(self.encoder, MODEL_VERSION, SETTINGS.encoder_timeout_s, "encoder")}
        # the first guess of how long a call holds its place (Retry-After), until calls have been timed
        self.lanes = {"cot": Lane("cot", SETTINGS.cot_queue, 5.0),
                      "embedding": Lane("embedding", SETTINGS.embedding_queue, 1.0)}
        self.store = _feedback_store(self.dataset)
        if not SETTINGS.api_token:
            log.warning("CIRCOT_API_TOKEN is not set: the API is open to anyone who can reach it")
        _running["service"] = self
        metrics().ready.labels(self.dataset).set(0)
        on_shutdown_signal(self._shut_down, SETTINGS.shutdown_grace_s, "front")
        threading.Thread(target=self._load, daemon=True).start()

    def _load(self) -> None:
        try:
            if MODEL_ERROR:
                raise LookupError(MODEL_ERROR)

            index = GalleryIndex(index_uri(SETTINGS.artifacts, SETTINGS.index_uri), self.dataset)
            self.paths = index.paths(MODEL_VERSION)    # fails, saying so, when no index was built for it
            self.by_hash = index.hashes(MODEL_VERSION) if self.excludes_reference else {}
            self.same_picture = index.same_picture(MODEL_VERSION, self.paths) if self.excludes_reference else None
            table_version = index.versions()[MODEL_VERSION]
            index.vectors(MODEL_VERSION)    # read now (and torch imported): the first query does not wait for it
            import torch  # noqa: F401
            self.index = index
            log.info("%s: model %s, gallery index %s version %d (tag %s) at %s, %d images; the reference is %s; "
                     "waiting for the encoder and the reasoner", self.dataset, MODEL_TAG, index.table_name,
                     table_version, index.tag(MODEL_VERSION), index.uri, len(self.paths),
                     "left out of rankings" if self.excludes_reference else "ranked like any image")
        except Exception as e:  # noqa: BLE001 - reported by /readyz and every call
            self.error = str(e) if isinstance(e, LookupError) else f"{type(e).__name__}: {e}"
            log.error("not ready: %s", self.error)

    def _shut_down(self) -> None:
        for link in self.links.values():
            link.shut_down(SETTINGS.shutdown_grace_s)

    def _own_reason(self) -> str | None:
        if self.error:
            return self.error
        if self.index is None:
            return "opening the gallery index"
        return None

    def front_reason(self) -> str | None:
        """Why the front cannot take API calls now (its settings, its gallery index), or None; whether
        a call's model process can take it is its link's to say (``ModelLink.call``). When what the
        calls found of the model processes differs from the readiness last said, it is asked again in
        the background: the ready gauge and the log line do not wait for the next /readyz."""
        why = self._own_reason()
        up = all(link.away is None and not link.closing for link in self.links.values())
        if why is None and self.ready != up and (self._checking is None or self._checking.done()):
            self._checking = asyncio.ensure_future(self.readiness())
        return why

    async def readiness(self) -> str | None:
        """Why the service cannot answer every kind of query now, or None (/readyz): the front's reason,
        else each model process asked (concurrently; at most every 0.5 s)."""
        why = self._own_reason()
        if why is None:
            whys = await asyncio.gather(*(link.probe() for link in self.links.values()))
            why = "; ".join(w for w in whys if w) or None
        if why is None and not self.ready:
            log.info("ready: serving %s with model %s (%d gallery images)", self.dataset, MODEL_TAG, len(self.paths))
            m = metrics()
            m.model.labels(self.dataset, self.version).set(1)
            m.gallery.labels(self.dataset).set(len(self.paths))
        if self.ready != (why is None):   # the gauge written when readiness changes, not on every call
            metrics().ready.labels(self.dataset).set(int(why is None))
        self.ready = why is None
        return why

    async def __is_ready__(self) -> bool:
        return await self.readiness() is None

    async def __is_alive__(self) -> bool:
        """/livez and /healthz: False once a model process has not answered at all (unreachable, or no
        answer to a probe) for ``liveness_grace_s``, or, never having answered, ``liveness_startup_s``
        after the service started. BentoML's arbiter restarts a dead model process
        when it can; where it does not (in a container), the process stays dead behind its socket and
        only a restart of the whole service (the orchestrator's liveness probe) brings it back. A
        process that answers "loading" or "cannot load the model" is alive: /readyz says why."""
        # answered at once: probes run in the background (watch(), and the link's recovery loop while it
        # is away), so a process that died between calls is found within a probe's timeout
        for link in self.links.values():
            link.watch()
        dead = silent_links(self.links.values(), SETTINGS.liveness_grace_s, SETTINGS.liveness_startup_s)
        for why in dead:
            log.error("not alive: %s", why)
        return not dead

    def _excluded(self, data: bytes, picture, reference_id: str) -> list[str]:
        """The gallery ids the dataset's protocol leaves out for this reference: those with its bytes,
        those that are its picture saved or sized otherwise (model_code.index.SamePicture), and the id
        the client named."""
        if not self.excludes_reference:
            return []

        ids = set(self.by_hash.get(bytes_md5(data), ()))
        if self.same_picture is not None:
            ids.update(self.same_picture.matches(picture))
        if reference_id:   # a gallery id (checked)
            ids.add(reference_id)
        return sorted(ids)

    @bentoml.api
    async def search(self, image: Path, modification: str, k: int = 10, mode: str = "cot",
                     dataset: str = "", reference_id: str = "", chain: dict | str = "", query_id: str = ""
                     ) -> SearchResponse:
        """The top-k gallery images for a reference image and a modification, with the reasoning.
        ``dataset``, when given, must be the one this deployment serves (default: that one);
        ``reference_id``: the reference's gallery id, when the client knows it (400 when it is not one).
        ``chain``: a chain of thought to rank with instead of the model's (a correction: the three
        sections as JSON, or the tagged text), checked as a teacher's chain is and teacher-forced before
        ``<emb>`` (no decoding; ``mode`` is then ``corrected``); ``query_id``: the query it corrects
        (same token, reference and modification), kept as a correction event."""

        label, outcome = ("corrected" if chain or query_id else mode if mode in MODES else "invalid"), "error"
        try:
            answer = await self._search(image, modification, k, "corrected" if label == "corrected" else mode,
                                        dataset, reference_id, chain, query_id)
            outcome = "ok"
            return answer
        except ApiError as e:
            outcome = "unavailable" if e.status == 503 else "bad_request" if e.status < 500 else "error"
            return e.response()
        finally:
            metrics().queries.labels(label, outcome).inc()
            note(mode=label, outcome=outcome)

    async def _search(self, image, modification, k, mode, dataset, reference_id, chain="", query_id=""
                      ) -> SearchResponse:

        if dataset and dataset != self.dataset:
            raise ApiError(f"this service serves {self.dataset}, not {dataset!r}", 404)
        if mode not in (*MODES, "corrected"):
            raise ApiError(f"mode must be one of {', '.join(MODES)}, not {mode!r}", 400)
        if mode == "corrected" and not chain:
            raise ApiError("query_id names the query a chain corrects: give the corrected chain as 'chain'", 400)
        # a corrected search is one forward pass: the embedding class, never behind CoT decoding
        traffic = "cot" if mode == "cot" else "embedding"
        async with self.lanes[traffic].admit():   # 503 at once when this class is full; the other class goes on
            return await self._answer(image, modification, k, mode, reference_id, traffic, chain, query_id)

    def _correction(self, chain: str, query_id: str, data: bytes, text: str):
        """(the checked chain, the query it corrects or None, the sections changed from the model's chain)
        of a corrected search; a QueryError with the status that says what is wrong."""
        cot = check_chain(chain)
        corrected = None
        if query_id:
            try:
                corrected = self.store.correction_of(query_id, SETTINGS.api_token, reference=data, modification=text)
            except FeedbackError as e:
                raise QueryError(str(e), e.status) from None
            except (OSError, ValueError) as e:   # a store that cannot be read, a damaged record: not the caller's
                log.error("query %s could not be read for a correction: %s", query_id, e)
                raise QueryError(f"query {query_id} cannot be read now: try again, or search without query_id",
                                 503) from None
        original, model_chain = corrected.origin() if corrected else (None, None)
        changed = changed_sections(cot, model_chain)
        return cot, corrected, changed, model_chain, original

    async def _answer(self, image, modification, k, mode, reference_id, traffic, chain="", query_id=""
                      ) -> SearchResponse:
        try:
            text = check_text(modification)
            if reference_id and reference_id not in self.paths:
                raise QueryError(f"reference_id {reference_id[:200]!r} is not an image of the {self.dataset} "
                                 "gallery: give a gallery id, or none")
            data = Path(image).read_bytes()
            picture = open_image(data, max_bytes=SETTINGS.max_image_bytes, max_pixels=SETTINGS.max_image_pixels)
            cot = corrected = model_chain = original = None
            changed: list[str] = []
            if mode == "corrected":
                cot, corrected, changed, model_chain, original = await asyncio.to_thread(
                    self._correction, chain, query_id, data, text)
            excluded = await asyncio.to_thread(self._excluded, data, picture, reference_id)
            most = min(SETTINGS.max_k, len(self.paths) - len(excluded))
            if not 1 <= k <= most:
                raise QueryError(f"k must be from 1 to {most}, not {k}")
            t0 = time.perf_counter()
            raw = (await self.links[traffic].call(
                "reason" if mode == "cot" else "embed_queries",
                [EncodedQuery(image=_b64(data), text=text, chain=cot.render() if cot else None)]))[0]
            a = raw if isinstance(raw, EncodedAnswer) else EncodedAnswer.model_validate(raw)
            t1 = time.perf_counter()
            ids, scores = search(self.index, self.version, np.asarray([a.embedding], dtype=np.float32), k,
                                 exclude=set(excluded) or None)
            t2 = time.perf_counter()
        except QueryError as e:
            raise ApiError(str(e), e.status) from None
        step = {"cot": "reasoning", "corrected": "corrected_embedding"}.get(mode, "embedding")
        m = metrics()
        m.phase.labels(step).observe(t1 - t0)
        m.phase.labels("index_search").observe(t2 - t1)
        if a.reasoning and a.reasoning.get("error"):
            m.unparsed.inc()
        timings = {step: round(t1 - t0, 4), "model_batch": a.seconds, "batch_size": a.batch,
                   "search": round(t2 - t1, 4)}
        note(timings=timings)
        hits = [Hit(image_id=i, score=round(s, 6), url=f"/ui/images/{self.dataset}/{i}")
                for i, s in zip(ids[0], scores[0])]
        shown_chain = a.reasoning
        if cot is not None:   # the person's chain is the reasoning of this answer
            shown_chain = {**dataclasses.asdict(cot), "raw": cot.render(), "error": None}
        answer_id = None
        try:   # what was shown, so that feedback refers to an answer the service gave
            answer_id = await asyncio.to_thread(
                self.store.record_query, reference=data, suffix=_suffix(data), modification=text,
                model_version=self.version, mode=mode, chain=shown_chain, shown=[h.image_id for h in hits],
                scores=[h.score for h in hits], token=SETTINGS.api_token, corrects=corrected)
            if corrected is not None:   # the correction itself: the model's chain and the person's, linked
                await asyncio.to_thread(self.store.record_correction, corrected, answer_id, SETTINGS.api_token,
                                        dataclasses.asdict(cot), changed)
        except OSError:   # the answer still goes out, without a query id to give feedback on
            log.exception("the query could not be recorded for feedback in %s", self.store.root)
        if cot is not None:
            m.corrections.labels("linked" if corrected is not None else "unlinked").inc()
            note(changed=",".join(changed))
        return SearchResponse(
            model_version=self.version, dataset=self.dataset, mode=mode,
            reasoning=Reasoning(**shown_chain) if shown_chain else None,
            correction=Correction(corrects=original,
                                  changed=changed, model_chain=Reasoning(**model_chain) if model_chain else None)
            if cot is not None else None,
            results=hits, excluded=excluded, timings=timings, query_id=answer_id)

    @bentoml.api
    async def feedback(self, query_id: str, chosen: str | None = None, rejected: list[str] | None = None,
                       none_of_these: bool = False) -> FeedbackAnswer:
        """A person's answer to a query this service answered: the image they wanted (``chosen``),
        images that are not it (``rejected``), or ``none_of_these``; one answer per query and token
        (the same again is 200 and kept once, a different one 409)."""
        outcome = "error"
        try:
            try:
                event, stored = await asyncio.to_thread(self.store.add, query_id, SETTINGS.api_token,
                                                        chosen=chosen or None, rejected=rejected or (),
                                                        none_of_these=none_of_these)
            except FeedbackError as e:
                raise ApiError(str(e), e.status) from None
            outcome = "accepted" if stored else "repeated"
            note(outcome=outcome)
            return FeedbackAnswer(query_id=event.query_id, token=event.token, chosen=event.chosen,
                                  rejected=event.rejected, none_of_these=event.none_of_these, stored=stored)
        except ApiError as e:
            outcome = FEEDBACK_REFUSALS.get(e.status, "error")
            note(outcome=outcome)
            return e.response()
        finally:
            metrics().feedback.labels(outcome).inc()

    @bentoml.api
    async def embed_image(self, images: list[Path]) -> list[list[float]]:
        """Gallery embeddings (L2-normalised) of uploaded images: up to ``CIRCOT_MAX_IMAGES``, sent to
        the encoder in batches of at most 32, one after another (BentoML's dispatcher sheds a part of
        a bigger one that waits longer than its latency budget)."""

        try:
            if not images:
                raise ApiError("no images: send one or more as 'images'", 400)
            if len(images) > SETTINGS.max_images:
                raise ApiError(f"{len(images)} images; at most {SETTINGS.max_images} a call (CIRCOT_MAX_IMAGES)", 413)
            data = [Path(i).read_bytes() for i in images]
            for n, d in enumerate(data, 1):
                try:
                    open_image(d, max_bytes=SETTINGS.max_image_bytes, max_pixels=SETTINGS.max_image_pixels)
                except QueryError as e:
                    raise ApiError(f"image {n} of {len(data)}: {e}", e.status) from None
            out: list[list[float]] = []
            async with self.lanes["embedding"].admit():
                for i in range(0, len(data), IMAGE_BATCH):
                    out += await self.links["embedding"].call("embed_images",
                                                              [_b64(d) for d in data[i: i + IMAGE_BATCH]])
            metrics().images.inc(len(out))
            return out
        except ApiError as e:
            return e.response()


CirCoTService.add_asgi_middleware(Guard, settings=SETTINGS, running=_running)
