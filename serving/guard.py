"""The front's ASGI middleware: what every request goes through.

In order: the bearer token (``CIRCOT_API_TOKEN``; ``/metrics`` too unless ``CIRCOT_METRICS_OPEN=1``),
``/metrics`` (the service's own Prometheus text), ``/readyz`` (200, or 503 with the reason and a
``Retry-After``), readiness for the API (503 with the reason before the index is open; a call whose
model process is away gets its 503 from its link, serving/link.py), the body of a POST to the API
(its media type, its size and, for a form, its multipart structure and that each file field is an
uploaded file: BentoML answers a malformed form with a 500 and fetches a URL given for a file), then
the request; every error answer leaves in one shape, ``{"error": "..."}`` (BentoML answers some as
a list, some in plain text), every answer carries ``X-Circot-Dataset``, and every request gets one log
line and its metrics, by route template.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import tempfile
import time
from http import HTTPStatus

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from serving.link import RETRY_AFTER_S
from serving.observability import exposition, log_request, metrics, route_of

API_PATHS = ("/search", "/embed_image")
FEEDBACK_MAX_BYTES = 16 * 1024    # a feedback body is a query id and a few image ids
# what each POST of the API takes: its media type and its form's file fields (each a part with a filename,
# never a text value: BentoML would read it as a URL to fetch), true where the field takes several images
FORMS = {"/search": ("multipart/form-data", {"image": False}),
         "/embed_image": ("multipart/form-data", {"images": True}),
         "/feedback": ("application/json", {})}
FIELD_MAX_BYTES = 64 * 1024       # a form's text field (a modification is at most 1000 characters)
PART_SLACK = 4 * 1024             # the headers of an image's part
PARTS_MAX = 1000                  # parts of one form (over Starlette's limit BentoML answers 500)
SPOOL_BYTES = 1 << 20             # a body is held in memory up to this size, in a temporary file beyond
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


class _Refused(Exception):
    """A request refused before the app sees it: its status and sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Gone(Exception):
    """The client went away while its body was read."""


class _FormCheck:
    """A multipart body checked as its bytes arrive, with the parser Starlette (so BentoML) uses: a
    :class:`_Refused` for what BentoML would answer with a 500 (a part without a name, bytes that do
    not follow the boundary, a field over Starlette's limits), a body without its closing boundary
    (cut short, or empty), and a text value where a file is expected."""

    def __init__(self, boundary: bytes, files: dict[str, bool]):
        self.boundary, self.files = boundary, files
        self.ended, self.parts = False, 0
        self.header, self.value, self.disposition = b"", b"", b""
        self.name, self.is_file, self.field_bytes = "", False, 0
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_end": self._end})

    def write(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except FormParserError as e:
            raise _Refused(400, f"the multipart body is malformed: {e}") from None

    def finish(self, size: int) -> None:
        if not self.ended:
            raise _Refused(400, "the multipart body is empty" if size == 0 else
                          "the multipart body ends before its closing boundary (--"
                          f"{self.boundary.decode('latin-1')}--): it was cut short")

    def _part_begin(self) -> None:
        self.disposition = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def _header_end(self) -> None:
        if self.header.lower() == b"content-disposition":
            self.disposition = self.value
        self.header, self.value = b"", b""

    def _headers_finished(self) -> None:
        self.parts += 1
        if self.parts > PARTS_MAX:
            raise _Refused(413, f"the form has over {PARTS_MAX} parts")
        options = parse_options_header(self.disposition)[1]
        if b"name" not in options:
            raise _Refused(400, 'a part of the form has no name (Content-Disposition: form-data; name="...")')
        self.name = options[b"name"].decode("utf-8", "replace")
        self.is_file, self.field_bytes = b"filename" in options, 0
        if self.name in self.files and not self.is_file:
            raise _Refused(400, f"{self.name} must be an uploaded file (a form part with a filename), not a "
                               "text value: the service fetches no URL and reads no path it is given")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self.is_file:
            self.field_bytes += end - start
            if self.field_bytes > FIELD_MAX_BYTES:
                raise _Refused(413, f"the form field {self.name!r} is over {FIELD_MAX_BYTES} bytes")

    def _end(self) -> None:
        self.ended = True


def _header(scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope.get("headers") or () if k.lower() == name), None)


def _form_check(scope, media: str, files: dict[str, bool]) -> _FormCheck | None:
    """The check of a body from its Content-Type (a :class:`_FormCheck` for a form), or a :class:`_Refused`:
    415 for another media type than the route's, 400 for a form without a boundary."""
    given = _header(scope, b"content-type")
    kind, options = parse_options_header(given)
    path = scope["path"]
    if not given:
        raise _Refused(415, f"POST {path} takes {media}; the request has no Content-Type")
    if kind.decode("latin-1") != media:
        raise _Refused(415, f"POST {path} takes {media}, not {kind.decode('latin-1')!r}")
    if media != "multipart/form-data":
        return None
    if not options.get(b"boundary"):
        raise _Refused(400, f"the multipart body has no boundary: send Content-Type: {media}; boundary=...")
    return _FormCheck(options[b"boundary"], files)


async def _read_body(receive, limit: int, check: _FormCheck | None, too_large: str):
    """The request's body read whole (in memory up to ``SPOOL_BYTES``, in a temporary file beyond) and
    checked as it arrives, with its size; a :class:`_Refused` (413 with ``too_large`` past ``limit``
    bytes: read no further) or :class:`_Gone`."""
    spool, size, more = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES), 0, True
    try:
        while more:
            message = await receive()
            if message["type"] != "http.request":
                raise _Gone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _Refused(413, too_large)
            if check is not None:
                check.write(chunk)
            spool.write(chunk)
            more = message.get("more_body", False)
        if check is not None:
            check.finish(size)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool, size


def _replay(spool, size: int, receive):
    """A ``receive`` that hands the app the body read, then the client's own messages (a disconnect)."""
    done = False

    async def replay():
        nonlocal done
        if done:
            return await receive()
        chunk = spool.read(SPOOL_BYTES)
        done = spool.tell() >= size
        return {"type": "http.request", "body": chunk, "more_body": not done}

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
            elif path == "/metrics" and method == "GET":
                body, kind = exposition()
                status = 200
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode()),
                                        (b"x-circot-dataset", dataset)]})
                await send({"type": "http.response.body", "body": body})
            elif path == "/readyz" or (path in API_PATHS and method == "POST"):
                # /readyz: the front and both model processes; an API call: the front (its model process's
                # link answers for that one, so a call of one class is not refused for the other's process)
                why = ("starting" if service is None else await service.readiness() if path == "/readyz"
                       else service.front_reason())
                if why:
                    await reply(503, {"error": f"not ready: {why}"}, {"Retry-After": str(RETRY_AFTER_S)})
                elif path == "/readyz":
                    await reply(200, {"ready": True, "dataset": service.dataset, "model_version": service.version})
                else:
                    await self._forward(scope, receive, send_shaped, reply)
            else:
                await self._forward(scope, receive, send_shaped, reply)
        except _Gone:   # nothing to answer; 499 in the log line, as nginx says it
            status = 499
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

    def _limit(self, path: str) -> int:
        """The most bytes a POST to ``path`` may carry."""
        if path == "/feedback":
            return FEEDBACK_MAX_BYTES
        images = self.settings.max_images if any(FORMS[path][1].values()) else 1
        return images * (self.settings.max_image_bytes + PART_SLACK) + FIELD_MAX_BYTES

    async def _forward(self, scope, receive, send, reply) -> None:
        """The request to the app; a POST of the API once its body is what its route takes, else its
        refusal (a 4xx). :class:`_Gone` when the client went away while its body was read."""
        path = scope["path"]
        if scope["method"] != "POST" or path not in FORMS:
            await self.app(scope, receive, send)
            return
        media, files = FORMS[path]
        limit = self._limit(path)
        too_large = f"the {path.lstrip('/')} body is over {limit} bytes" + (
            f": images of at most {self.settings.max_image_bytes} bytes (CIRCOT_MAX_IMAGE_BYTES) and the form's "
            "fields" if files else "")
        try:
            check = _form_check(scope, media, files)
            declared = _header(scope, b"content-length") or b""
            if declared.isdigit() and int(declared) > limit:   # refused before a byte of it is read
                raise _Refused(413, too_large)
            spool, size = await _read_body(receive, limit, check, too_large)
        except _Refused as e:
            if path == "/feedback" and e.status == 413:
                metrics().feedback.labels("too_large").inc()
            await reply(e.status, {"error": str(e)})
            return
        with spool:
            await self.app(scope, _replay(spool, size, receive), send)

    def _authorized(self, scope) -> bool:
        token = self.settings.api_token
        if not token:
            return True
        if scope["path"] == "/metrics" and self.settings.metrics_open:
            return True
        headers = dict(scope.get("headers") or [])
        return headers.get(b"authorization", b"").decode("latin-1") == f"Bearer {token}"
