"""The front's ASGI middleware: what every request goes through.

In order: the bearer token (``CIRCOT_API_TOKEN``; ``/metrics`` too unless ``CIRCOT_METRICS_OPEN=1``),
``/metrics`` (the service's own Prometheus text), ``/readyz`` (200, or 503 with the reason and a
``Retry-After``), readiness for the API (503 with the reason before the model and index are
there or while the encoder is away), then the request; every error answer leaves in one shape,
``{"error": "..."}`` (BentoML answers some as a list, some in plain text), every answer carries
``X-Circot-Dataset``, and every request gets one log line and its metrics, by route template.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
from http import HTTPStatus

from serving.link import RETRY_AFTER_S
from serving.observability import exposition, log_request, metrics, route_of

API_PATHS = ("/search", "/embed_image")
FEEDBACK_MAX_BYTES = 16 * 1024    # a feedback body is a query id and a few image ids
OPEN_PATHS = ("/livez", "/healthz", "/readyz", "/ui", "/ui/")
# what a handler tells the request's log line (mode, timings, outcome), per request
NOTES: contextvars.ContextVar[dict] = contextvars.ContextVar("circot_request_notes")
_OBJECT_TEXT = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def note(**fields) -> None:
    """Add fields to the current request's log line."""
    notes = NOTES.get(None)
    if notes is not None:
        notes.update(fields)


def error_message(status: int, body: bytes) -> str:
    """The one sentence of an error answer, whatever shape it came in."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = text
    if isinstance(data, list):
        data = "; ".join(str(d.get("error", d)) if isinstance(d, dict) else str(d) for d in data)
    if isinstance(data, dict):
        if isinstance(data.get("detail"), list) and data["detail"]:   # BentoML's validation errors
            parts = []
            for d in data["detail"]:
                where = ".".join(str(x) for x in d.get("loc", ()) if x not in ("body", "query"))
                parts.append(f"{where}: {d.get('msg', '')}" if where else str(d.get("msg", d)))
            data = "the request's fields are not right: " + "; ".join(parts)
        else:
            data = data.get("error") or data.get("detail") or json.dumps(data)
    message = _OBJECT_TEXT.sub("", str(data)).strip()
    return message or HTTPStatus(status).phrase


def _json(status: int, payload: dict, headers: dict | None = None) -> tuple[dict, bytes]:
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    return {"type": "http.response.start", "status": status, "headers": raw}, body


async def _small_body(receive):
    """A ``receive`` that replays the request's body, read whole, or None when it is over
    ``FEEDBACK_MAX_BYTES`` (read no further)."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":   # the client went away: let the app see it
            return receive
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > FEEDBACK_MAX_BYTES:
            return None
        more = message.get("more_body", False)
    body, sent = b"".join(chunks), False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class Guard:
    """Pure ASGI (no BaseHTTPMiddleware: a cancelled or streamed answer passes through untouched)."""

    def __init__(self, app, settings, running: dict):
        self.app, self.settings, self.running = app, settings, running

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path, method = scope["path"], scope["method"]
        route = route_of(path)
        notes: dict = {}
        token = NOTES.set(notes)
        status = 500
        dataset = self.settings.serve_dataset.encode()

        async def reply(status_: int, payload: dict, headers: dict | None = None) -> None:
            nonlocal status, started
            started = True
            start_msg, body = _json(status_, payload, headers)
            start_msg["headers"].append((b"x-circot-dataset", dataset))
            status = status_
            if status_ >= 400:
                notes.setdefault("error", payload.get("error"))
            await send(start_msg)
            await send({"type": "http.response.body", "body": body})

        held: dict | None = None
        chunks: list[bytes] = []
        started = False

        async def send_shaped(message) -> None:
            """Errors are held, reshaped to {"error": ...} and sent whole; the rest passes through."""
            nonlocal status, held, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-circot-dataset"]
                message = {**message, "headers": headers + [(b"x-circot-dataset", dataset)]}
                if status >= 400:
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                text = error_message(status, b"".join(chunks))
                notes.setdefault("error", text)
                keep = {k: v for k, v in ((k.decode().lower(), v.decode()) for k, v in held["headers"])
                        if k in ("retry-after", "www-authenticate", "x-circot-dataset", "server")}
                start_msg, body = _json(status, {"error": text}, keep)
                await send(start_msg)
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        try:
            service = self.running.get("service")
            if not self._authorized(scope) and path not in OPEN_PATHS:
                await reply(401, {"error": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                            {"WWW-Authenticate": "Bearer"})
            elif path == "/feedback" and method == "POST" and (receive := await _small_body(receive)) is None:
                metrics().feedback.labels("too_large").inc()
                await reply(413, {"error": f"the feedback body is over {FEEDBACK_MAX_BYTES} bytes"})
            elif path == "/metrics" and method == "GET":
                body, kind = exposition()
                status = 200
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode()),
                                        (b"x-circot-dataset", dataset)]})
                await send({"type": "http.response.body", "body": body})
            elif path == "/readyz" or (path in API_PATHS and method == "POST"):
                why = await service.readiness(probe=path == "/readyz") if service is not None else "starting"
                if why:
                    await reply(503, {"error": f"not ready: {why}"}, {"Retry-After": str(RETRY_AFTER_S)})
                elif path == "/readyz":
                    await reply(200, {"ready": True, "dataset": service.dataset, "model_version": service.version})
                else:
                    await self.app(scope, receive, send_shaped)
            else:
                await self.app(scope, receive, send_shaped)
        except Exception:  # noqa: BLE001 - a bug below: logged with its traceback, answered 500 when still possible

            logging.getLogger("circot.service").exception("%s %s failed", method, path)
            status = 500
            if not started:
                await reply(500, {"error": "internal error; the server's log has its traceback"})
        finally:
            NOTES.reset(token)
            seconds = time.perf_counter() - start
            log_request(method, path, route, status, seconds, notes)
            m = metrics()
            m.requests.labels(route, method if method in ("GET", "POST", "HEAD") else "other", str(status)).inc()
            m.latency.labels(route).observe(seconds)

    def _authorized(self, scope) -> bool:
        token = self.settings.api_token
        if not token:
            return True
        if scope["path"] == "/metrics" and self.settings.metrics_open:
            return True
        headers = dict(scope.get("headers") or [])
        return headers.get(b"authorization", b"").decode("latin-1") == f"Bearer {token}"
