"""Admission in the front: a bounded queue per traffic class, so that one class cannot fill the service
for the other.

The two classes go to different model processes: ``cot`` (CoT ``/search``: decoding, seconds a batch,
on the reasoner) and ``embedding`` (no-CoT ``/search`` and ``/embed_image``: one forward pass, on the
encoder). Each :class:`Lane` counts the calls of its class that a front worker holds, from admission
to the answer (waiting for the model or being answered); at its limit (``CIRCOT_COT_QUEUE``,
``CIRCOT_EMBEDDING_QUEUE``) one more call is refused at once with 503, a ``Retry-After`` of about how
long a call of that class holds its place (measured: a moving average) and a sentence naming the class.
The other class is not affected: it has its own lane, its own model process and its own batches.
The count is per front worker (the front runs one worker unless configured otherwise).
"""

from __future__ import annotations

import contextlib
import math
import time

from serving.link import ApiError
from serving.observability import metrics

# what each class is, in the refusal's words, and the setting that bounds it
CLASSES = {"cot": ("the CoT queue", "CIRCOT_COT_QUEUE"), "embedding": ("the embedding queue", "CIRCOT_EMBEDDING_QUEUE")}
RETRY_AFTER_MAX_S = 60
SMOOTHING = 0.2     # the weight of the newest call in the moving average of how long a call holds its place


class Lane:
    """The calls of one traffic class a front worker holds at once, at most ``limit``."""

    def __init__(self, name: str, limit: int, typical_s: float):
        self.name, self.limit = name, limit
        self.held = 0
        self.typical_s = typical_s      # how long a call holds its place: a moving average, from a first guess
        metrics().queue_limit.labels(name).set(limit)
        metrics().queue_depth.labels(name).set(0)

    def retry_after(self) -> int:
        """Seconds until a place is likely free: how long a call of this class holds its place."""
        return max(1, min(RETRY_AFTER_MAX_S, math.ceil(self.typical_s)))

    @contextlib.asynccontextmanager
    async def admit(self):
        """Hold a place for the call, or raise :class:`ApiError` 503 when the class is full."""
        m = metrics()
        if self.held >= self.limit:
            m.queue_refused.labels(self.name).inc()
            what, setting = CLASSES[self.name]
            wait = self.retry_after()
            raise ApiError(f"{what} is full: {self.held} calls of this kind are being answered or waiting (at most "
                           f"{self.limit}, {setting}); try again in {wait} s", 503, retry_after=wait)
        self.held += 1
        m.queue_depth.labels(self.name).set(self.held)
        start = time.monotonic()
        answered = False
        try:
            yield
            answered = True
        finally:
            self.held -= 1
            m.queue_depth.labels(self.name).set(self.held)
            if answered:   # a failed call (the model away) says nothing about how long an answer takes
                self.typical_s += SMOOTHING * (time.monotonic() - start - self.typical_s)
