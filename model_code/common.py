"""One progress line for long loops: count, rate and ETA, at most every few seconds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Progress:
    """``step(n)`` counts work done, ``update(done)`` sets it; either logs "<what>: done/total
    (rate/s, ETA s)" when ``every_s`` has passed since the last line, and at the end."""

    def __init__(self, total: int, what: str, *, say: Callable[[str], None] | None = None, every_s: float = 5.0):
        self.total, self.what, self.every = total, what, every_s
        self.say = say or log.info
        self.start = self.last = time.monotonic()
        self.done = 0

    def step(self, n: int = 1) -> None:
        self.update(self.done + n)

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate else float("inf")
        self.say(f"{self.what}: {done}/{self.total} ({rate:.1f}/s, ETA {eta:.0f}s)")
