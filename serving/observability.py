"""What an operator reads: the service's log lines (text, or JSON lines with ``CIRCOT_LOG_JSON=1``)
and its Prometheus metrics, labelled by route templates so that no URL a client makes up adds a series.

Metrics go through ``prometheus_client`` in its multiprocess mode (``bentoml serve`` sets
``PROMETHEUS_MULTIPROC_DIR`` for every worker), imported on first use, inside the worker; the front's
``/metrics`` reads every process's files (the front's, the encoder's and the reasoner's).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

from pydantic import ValidationError

ACCESS = logging.getLogger("circot.access")

# every path the front answers, as the route template its metrics and log lines carry
ROUTES = ("/search", "/feedback", "/embed_image", "/readyz", "/livez", "/healthz", "/metrics", "/docs.json",
          "/schema.json")
IMAGE_ROUTE = "/ui/images/{dataset}/{image_id}"
OTHER = "other"
PROBES = ("/readyz", "/livez", "/healthz", "/metrics")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def route_of(path: str) -> str:
    """The route template of a request path; ``other`` for anything the service does not serve."""
    if path in ROUTES or path == "/":
        return path
    if path in ("/ui", "/ui/"):
        return "/ui/"
    if path.startswith("/ui/images/") and path.count("/") == 4:
        return IMAGE_ROUTE
    if path.startswith("/static_content/"):
        return "/static_content/"
    return OTHER


# ---------------------------------------------------------------------------------------------
# logs


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the request's fields when it is one."""

    FIELDS = ("method", "route", "path", "status", "ms", "dataset", "mode", "outcome", "timings")

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                       + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        out.update({f: getattr(record, f) for f in self.FIELDS if getattr(record, f, None) is not None})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _NoClientErrorTracebacks(logging.Filter):
    """BentoML logs every refused request ("Exception on /search [POST]") as an ERROR with its
    traceback; a 4xx (a bad input) is the client's doing: its one line is the access line, a WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or not record.getMessage().startswith("Exception on "):
            return True
        error = record.exc_info[1]

        code = getattr(getattr(error, "error_code", None), "value", 500)
        return not (isinstance(error, ValidationError) or code < 500)


_configured = False


def setup_logging(json_lines: bool) -> None:
    """The ``circot`` loggers at INFO on stdout (BentoML sets the root at WARNING), in JSON when asked
    (BentoML's own lines too); once per process."""
    global _configured
    if _configured:
        return
    _configured = True

    formatter = JsonFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    circot = logging.getLogger("circot")
    circot.handlers[:] = [handler]
    circot.setLevel(logging.INFO)
    circot.propagate = False
    for name in ("circot", "circot.service", "circot.access", "circot.link"):
        logging.getLogger(name).disabled = False   # a logging.config.dictConfig after import disables them
    if json_lines:
        for name in ("", "bentoml", "uvicorn.error", "circus"):
            for h in logging.getLogger(name).handlers:
                h.setFormatter(formatter)
    quiet = _NoClientErrorTracebacks()
    for name in ("bentoml._internal.server.http_app", "bentoml"):
        logging.getLogger(name).addFilter(quiet)
    for h in logging.getLogger("bentoml").handlers + logging.getLogger().handlers:
        h.addFilter(quiet)


_last_probe: dict[str, tuple] = {}


def log_request(method: str, path: str, route: str, status: int, seconds: float, notes: dict) -> None:
    """The request's one line: INFO, WARNING for a 4xx, ERROR for a 5xx; probes only when they fail."""
    level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
    if route in PROBES:   # polled every few seconds: a line when the answer changes, not at every poll
        said = (status, re.sub(r"\d+", "#", str(notes.get("error"))) if notes.get("error") else None)
        level = logging.DEBUG if said == _last_probe.get(route, (200, None)) else min(level, logging.WARNING)
        _last_probe[route] = said
    ms = round(seconds * 1000, 1)
    extra = {"method": method, "route": route, "path": path[:200], "status": status, "ms": ms, **notes}
    text = f"{method} {path[:200]} {status} {ms} ms"
    if notes.get("timings"):
        text += " (" + ", ".join(f"{k} {v}" for k, v in notes["timings"].items()) + ")"
    if notes.get("error"):
        text += f": {notes['error']}"
    ACCESS.log(level, text, extra={k: v for k, v in extra.items() if k != "error"})


# ---------------------------------------------------------------------------------------------
# metrics


class Metrics:
    """The service's own series (``circot_*``)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("circot_http_requests_total", "HTTP requests by route template, method and status",
                                ["route", "method", "status"])
        self.latency = Histogram("circot_http_request_duration_seconds", "HTTP request duration by route template",
                                 ["route"], buckets=LATENCY_BUCKETS)
        self.queries = Counter("circot_queries_total", "/search queries by mode (cot, no_cot, corrected) and outcome "
                               "(ok, bad_request, unavailable, error)", ["mode", "outcome"])
        self.corrections = Counter("circot_corrected_searches_total", "answered /search calls with a chain a person "
                                   "gave: linked to the query it corrects (query_id) or not", ["link"])
        self.phase = Histogram("circot_query_phase_seconds", "time of a query's phases: reasoning (cot), embedding "
                               "(no_cot), corrected_embedding (a given chain), index_search", ["phase"],
                               buckets=LATENCY_BUCKETS)
        self.unparsed = Counter("circot_chains_unparsed_total", "CoT chains the model wrote that did not parse")
        self.feedback = Counter("circot_feedback_total", "POST /feedback answers by outcome (accepted, repeated, "
                                "invalid, unknown_query, expired, conflict, too_large, error)",
                                ["outcome"])
        self.images = Counter("circot_embedded_images_total", "images embedded through /embed_image")
        self.model = Gauge("circot_model_info", "the model served (1 while ready)", ["dataset", "model_version"],
                           multiprocess_mode="livemax")
        self.gallery = Gauge("circot_gallery_images", "images in the gallery index served", ["dataset"],
                             multiprocess_mode="livemax")
        self.ready = Gauge("circot_ready", "1 when the service answers queries, else 0", ["dataset"],
                           multiprocess_mode="livemax")
        # admission per traffic class (serving/traffic.py): summed over the front's workers
        self.queue_depth = Gauge("circot_queue_calls", "calls of a traffic class (cot, embedding) the front holds now: "
                                 "being answered or waiting for the model", ["class"], multiprocess_mode="livesum")
        self.queue_limit = Gauge("circot_queue_limit", "the most calls of a traffic class the front holds at once",
                                 ["class"], multiprocess_mode="livesum")
        self.queue_refused = Counter("circot_queue_refused_total", "calls refused with 503 because their traffic "
                                     "class was full", ["class"])


_metrics: Metrics | None = None


def metrics() -> Metrics:
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of every process of this server (or of this process outside ``bentoml serve``)."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
