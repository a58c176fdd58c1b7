"""Locust users for bench/load_service.py. ``LOAD_IMAGE``: the reference image to upload; ``LOAD_TOKEN``: a
bearer token if the service wants one.

- ``Client``: one kind of call, ``LOAD_TARGET`` embed_image, search_no_cot, search_cot or search_corrected
  (a chain given back with its conclusion rewritten, after one CoT search per user): the sweep.
- ``CotUser`` and ``NoCotUser``: CoT and no-CoT ``/search`` together, ``LOAD_COT_USERS`` and
  ``LOAD_NOCOT_USERS`` of each (the mixed run). With ``LOAD_HONOUR_RETRY_AFTER=1`` a user that gets a
  503 waits the ``Retry-After`` it was given before its next call.

With ``LOAD_RECORD`` every call is written there, one line each: the user class, the status (0: no
answer), the seconds it took and when it started (``time.time()``), tab-separated.
"""

import json
import os
import time

from locust import HttpUser, constant, events, task

IMAGE = open(os.environ["LOAD_IMAGE"], "rb").read()
TARGET = os.environ.get("LOAD_TARGET", "embed_image")
HEADERS = {"Authorization": f"Bearer {os.environ['LOAD_TOKEN']}"} if os.environ.get("LOAD_TOKEN") else {}
HONOUR_RETRY_AFTER = os.environ.get("LOAD_HONOUR_RETRY_AFTER") == "1"
RECORD = open(os.environ["LOAD_RECORD"], "a", buffering=1) if os.environ.get("LOAD_RECORD") else None


def search(client, mode: str):
    """One /search of the reference image in ``mode``; the response."""
    return client.post("/search", files={"image": ("ref.png", IMAGE)},
                       data={"modification": "make the red shape blue", "k": "10", "mode": mode},
                       headers=HEADERS, name=f"/search {mode}")


@events.request.add_listener
def _record(request_type, name, response_time, response, exception, start_time=None, **_):
    if RECORD is not None:
        status = getattr(response, "status_code", 0) or 0
        RECORD.write(f"{name}\t{status}\t{response_time / 1000:.4f}\t{start_time or time.time():.3f}\n")


def corrected(client, chain: dict, query_id: str):
    """One /search with a corrected chain (the query ``query_id`` answered, its conclusion rewritten)."""
    return client.post("/search", files={"image": ("ref.png", IMAGE)},
                       data={"modification": "make the red shape blue", "k": "10", "chain": json.dumps(chain),
                             "query_id": query_id}, headers=HEADERS, name="/search corrected")


class Client(HttpUser):
    wait_time = constant(0)  # each user sends its next request as soon as the last is answered
    correction: tuple[dict, str] | None = None

    def on_start(self):
        if TARGET == "search_corrected":   # the query to correct: one CoT search (not counted), its chain rewritten
            answer = self.client.post("/search", files={"image": ("ref.png", IMAGE)},
                                      data={"modification": "make the red shape blue", "k": "10", "mode": "cot"},
                                      headers=HEADERS, name="(setup) /search cot").json()
            chain = {s: answer["reasoning"][s] or "x" for s in ("caption", "reasoning", "conclusion")}
            self.correction = ({**chain, "conclusion": "top left: large blue circle"}, answer["query_id"])

    @task
    def call(self):
        if TARGET == "embed_image":
            self.client.post("/embed_image", files={"images": ("ref.png", IMAGE)}, headers=HEADERS)
        elif TARGET == "search_corrected":
            corrected(self.client, *self.correction)
        else:
            search(self.client, "cot" if TARGET == "search_cot" else "no_cot")


class _Mixed(HttpUser):
    abstract = True
    mode = ""
    wait_time = constant(0)

    @task
    def call(self):
        answer = search(self.client, self.mode)
        retry_after = answer.headers.get("Retry-After", "") if answer.status_code == 503 else ""
        if HONOUR_RETRY_AFTER and retry_after.isdigit():
            time.sleep(int(retry_after))   # gevent's sleep (locust patches time): this user only


class CotUser(_Mixed):
    mode = "cot"
    fixed_count = int(os.environ.get("LOAD_COT_USERS", "0"))


class NoCotUser(_Mixed):
    mode = "no_cot"
    fixed_count = int(os.environ.get("LOAD_NOCOT_USERS", "0"))
