"""The front's link to a model process (the encoder, the reasoner): every call bounded in time, and
failing at once, with the reason, while that process is away.

Each model runs in its own process behind a socket that BentoML's arbiter keeps open while it
restarts the process, so a call sent to a dead one does not fail: it waits in the socket's
queue. The link therefore decides itself when its process is away: a dropped connection or an
unanswered probe (``state``, within ``PROBE_TIMEOUT_S``) marks it away, which fails the calls in
flight at once; while away, calls are refused without being sent and a probe in the background
(at most every ``PROBE_EVERY_S``) brings it back when the process answers with its model loaded.
The front holds one link per model process: one being away does not refuse the other's calls.
After SIGTERM (:meth:`ModelLink.shut_down`) calls in flight get ``shutdown_grace_s`` to finish,
then 503, so the process exits within seconds under load too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time

import aiohttp
from starlette.responses import JSONResponse

log = logging.getLogger("circot.link")

PROBE_TIMEOUT_S = 2.0
PROBE_EVERY_S = 0.5
RETRY_AFTER_S = 5


class ApiError(Exception):
    """A refusal with its HTTP status and a sentence (and for a 503, when to try again)."""

    def __init__(self, message: str, status: int, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after if retry_after is not None else (RETRY_AFTER_S if status == 503 else None)

    def response(self):

        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return JSONResponse({"error": str(self)}, status_code=self.status, headers=headers)


def _connection_lost(error: BaseException) -> bool:

    return isinstance(error, (aiohttp.ClientConnectionError, ConnectionError))


class ModelLink:
    """The calls to one model process (``name``: how messages call it, "encoder" or "reasoner")."""

    def __init__(self, client, version: str | None, timeout_s: float, name: str):
        self.client, self.version, self.timeout_s, self.name = client, version, timeout_s, name
        self.away: str | None = "not probed yet"    # why the process cannot take calls, or None
        self.away_since: float | None = None
        # since when the process has not answered at all (dead, stuck, or not started yet); whether it ever has
        self.silent_since: float | None = time.monotonic()
        self.answered = False
        self.closing: str | None = None
        self._probe_started = 0.0
        self._probe: asyncio.Task | None = None
        self._recovery: asyncio.Task | None = None
        self._lost: asyncio.Event | None = None     # set when the process is lost: calls in flight end

    # ---- state -----------------------------------------------------------------------------

    def _lost_event(self) -> asyncio.Event:
        if self._lost is None:
            self._lost = asyncio.Event()
        return self._lost

    def _mark_away(self, why: str, silent: bool = False) -> None:
        """``silent``: the process did not answer at all (unreachable, or no answer in time), as opposed
        to answering that it cannot take calls (loading, a model that cannot load)."""
        if not silent:
            self.silent_since, self.answered = None, True
        elif self.silent_since is None:
            self.silent_since = time.monotonic()
        if self.away is None:
            self.away_since = time.monotonic()
            log.error("the %s is away: %s; its calls are refused with 503 until it answers again", self.name, why)
            self._lost_event().set()
            self._lost = asyncio.Event()
        self.away = why
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.ensure_future(self._recover())

    async def _recover(self) -> None:
        """While away: probe every PROBE_EVERY_S until the process answers with its model."""
        while self.away is not None and not self.closing:
            await asyncio.sleep(PROBE_EVERY_S)
            await self.probe()

    def _mark_back(self) -> None:
        if self.away is not None and self.away_since is not None:
            log.warning("the %s is back after %.1f s", self.name, time.monotonic() - self.away_since)
        self.away, self.away_since, self.silent_since, self.answered = None, None, None, True

    def silent_for(self) -> float:
        """How long the process has not answered at all (seconds; 0 while it answers; before its first
        answer, since the link was made): what liveness reads (a process that answers, even "loading",
        is alive)."""
        return 0.0 if self.silent_since is None else time.monotonic() - self.silent_since

    def reason(self) -> str | None:
        """Why calls are refused now, or None."""
        if self.closing:
            return self.closing
        if self.away is None:
            return None
        since = f" for {time.monotonic() - self.away_since:.0f} s" if self.away_since else ""
        return f"the {self.name} is away{since}: {self.away}"

    async def probe(self, since: float | None = None) -> str | None:
        """Ask the process for its state (concurrent askers share a probe; at most one every
        PROBE_EVERY_S, or one started after ``since``): the reason it cannot take calls, or None.
        A dropped connection or no answer marks it away."""
        now = time.monotonic()
        if (self._probe is None or (since is not None and self._probe_started < since)
                or (self._probe.done() and now - self._probe_started >= PROBE_EVERY_S)):
            self._probe_started = now
            self._probe = asyncio.ensure_future(self._probe_once())
        await asyncio.shield(self._probe)
        return self.reason()

    def watch(self) -> None:
        """Probe in the background when the last probe is older than PROBE_EVERY_S, holding no call
        for it: a process that died between calls is found within PROBE_TIMEOUT_S, and the call
        sent to it meanwhile (waiting in the socket's queue) ends then with 503."""
        if self._probe is None or (self._probe.done() and time.monotonic() - self._probe_started >= PROBE_EVERY_S):
            self._probe_started = time.monotonic()
            self._probe = asyncio.ensure_future(self._probe_once())

    async def _probe_once(self) -> None:
        try:
            state = await asyncio.wait_for(self.client.to_async.state(), PROBE_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._mark_away(f"it did not answer within {PROBE_TIMEOUT_S:g} s (restarting or stuck)", silent=True)
        except Exception as e:  # noqa: BLE001 - any failure to reach it is a reason
            lost = _connection_lost(e)
            self._mark_away(f"it cannot be reached ({type(e).__name__})" if lost
                            else f"its state cannot be read ({type(e).__name__}: {str(e)[:200]})", silent=lost)
        else:
            if state.get("error"):
                self._mark_away(f"it cannot load the model: {state['error']}")
            elif state.get("version") is None:
                self._mark_away("it is loading the model")
            elif self.version is not None and state["version"] != self.version:
                self._mark_away(f"it loaded model {state['version']}, the index is for {self.version}: restart "
                                "the service")
            else:
                self._mark_back()

    # ---- calls -----------------------------------------------------------------------------

    async def call(self, method: str, *args):
        """``<process>.<method>(*args)``, or an ApiError: 503 with the reason (and Retry-After)
        when the process is away, is lost during the call, does not answer within the timeout, or
        sheds the call. While it is away a call waits for a probe (shared; at most every
        PROBE_EVERY_S); otherwise a probe older than that is started in the background."""
        if self.away is not None and not self.closing:
            await self.probe()
        else:
            self.watch()
        why = self.reason()
        if why:
            raise ApiError(f"not ready: {why}", 503)
        for attempt in (1, 2):
            try:
                return await self._bounded(getattr(self.client.to_async, method)(*args))
            except ApiError:
                raise
            except Exception as e:  # noqa: BLE001 - sorted below
                if not _connection_lost(e):
                    raise self._refusal(e) from None
                # a pooled connection the process's server closed (bentoml/BentoML#4971) is retried once,
                # when the process answers a probe; a dead process fails every call in flight
                log.warning("%s connection lost during %s (%s); probing it", self.name, method, type(e).__name__)
                if attempt == 2 or await self.probe(since=time.monotonic()):
                    self._mark_away(f"the connection dropped ({type(e).__name__})", silent=True)
                    raise ApiError(f"not ready: {self.reason()}", 503) from None

    async def _bounded(self, call):
        lost = self._lost_event()
        task = asyncio.ensure_future(call)
        waiter = asyncio.ensure_future(lost.wait())
        try:
            done, _ = await asyncio.wait({task, waiter}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task in done:
            return task.result()
        task.cancel()
        if waiter in done:
            raise ApiError(f"not ready: {self.reason() or f'the {self.name} was lost during the call'}", 503)
        asyncio.ensure_future(self.probe())
        raise ApiError(f"the {self.name} did not answer within {self.timeout_s:g} s (CIRCOT_ENCODER_TIMEOUT_S); "
                       "it is overloaded or stuck", 503)

    def _refusal(self, error: Exception) -> Exception:
        code = getattr(getattr(error, "error_code", None), "value", None)
        if code == 503:     # BentoML's dispatcher shed it (too many waiting), or the process restarted
            return ApiError(f"the {self.name} is overloaded or restarting (it answered 503); try again", 503)
        if code is not None:
            return ApiError(f"the {self.name} refused the call ({code}): {str(error)[:300]}", 502)
        return error        # not the link's doing: a bug, answered 500 with its traceback in the log

    def shut_down(self, grace_s: float) -> None:
        """SIGTERM: new calls get 503 at once; calls in flight get ``grace_s`` to finish, then 503."""
        self.closing = "the service is shutting down"
        loop = asyncio.get_running_loop()
        loop.call_later(grace_s, self._lost_event().set)


def silent_links(links, grace_s: float, startup_s: float) -> list[str]:
    """Why the service is not alive (/livez): each link whose process has not answered at all for
    ``grace_s`` seconds, or, never having answered, ``startup_s`` since the link was made (its process
    imports the stack and starts its server first). Empty: alive."""
    out = []
    for link in links:
        grace = grace_s if link.answered else startup_s
        if link.silent_for() > grace:
            out.append(f"the {link.name} has not answered for {link.silent_for():.0f} s"
                       f"{'' if link.answered else ' since the service started'} ({link.away})")
    return out


def on_shutdown_signal(callback, grace_s: float, name: str) -> None:
    """On the first SIGTERM or SIGINT, ``callback()`` in the event loop, then the handler that was
    there (uvicorn's: stop accepting, wait for the calls in flight); and should the process still be
    alive ``grace_s`` + 5 s later, it exits (BentoML's arbiter would wait a day for it). Call from
    the event loop's thread (a service's ``__init__``)."""

    loop = asyncio.get_running_loop()
    fired = []

    def watchdog() -> None:
        time.sleep(grace_s + 5)
        log.error("%s: still running %.0f s after the shutdown signal: exiting now", name, grace_s + 5)
        os._exit(0)

    def wrap(previous):
        def handler(sig, frame):
            if not fired:
                fired.append(sig)
                log.warning("%s: shutting down (signal %d): calls in flight have %g s", name, sig, grace_s)
                loop.call_soon_threadsafe(callback)
                threading.Thread(target=watchdog, daemon=True, name="circot-shutdown-watchdog").start()
            if callable(previous):
                previous(sig, frame)
            elif previous == signal.SIG_DFL:   # nobody else handles it: the default (exit) now
                signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)
        return handler

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, wrap(signal.getsignal(sig)))
    except ValueError:   # not the main thread: BentoML's own shutdown applies
        log.warning("%s: cannot watch shutdown signals outside the main thread", name)
