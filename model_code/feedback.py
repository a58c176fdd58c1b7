"""The feedback loop's data: what the service showed for each query, what a person answered, and the
training triplets their answers become.

Layout under ``<artifacts>/feedback/<dataset>/``:

- ``queries/<query id>.json``: what the service answered (reference image's content hash and file,
  modification, model version, mode, chain, the ids and scores shown, the token's identity, time);
- ``images/<md5>.<ext>``: the uploaded reference images, named by their content;
- ``events/<query id>/<token identity>.json``: one answer per query and token, created exclusively
  (a hard link that fails rather than replace), so several service workers may write at once, a
  server killed mid-write leaves at most a temporary file (never a half event), and an event is
  never written twice: the same answer again is accepted as already there, a different one refused;
- ``events/<query id>/<token identity>.correction.<corrected query id>.json``: a correction (kind
  ``correction``): the model's chain of the query, the person's, the sections changed, and the query
  id the corrected search was answered as (itself a query under ``queries/``, mode ``corrected``).

:func:`collect_triplets` turns the events into training triplets (the chosen image the target, the
shown-and-rejected ones hard negatives; a pick on a corrected search brings the person's chain
along), de-duplicated, at most ``cap_per_token`` per token, with a
leakage guard: a query whose reference or target is an image of a held-out split never becomes
training data.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import pydantic
from fsspec.core import url_to_fs

from model_code.chain import SECTIONS, changed_sections
from model_code.common import bytes_md5

QUERY_ID = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_TTL_S = 7 * 24 * 3600    # feedback on a query older than this is refused (410)


class FeedbackError(ValueError):
    """Feedback that cannot be taken; ``status`` is the HTTP status the service answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ShownQuery(pydantic.BaseModel):
    """What the service answered for one query (kept so that feedback refers to a real answer)."""

    query_id: str
    dataset: str
    time: float
    token: str                       # the identity of the bearer token ("anonymous" without auth)
    reference_hash: str              # md5 of the uploaded image's bytes
    reference_file: str              # its copy, relative to the dataset's feedback folder
    modification: str
    model_version: str
    mode: str
    chain: dict | None = None
    shown: list[str]
    scores: list[float]
    # a corrected search (mode "corrected"): the query whose chain a person corrected (the first one, when a
    # correction is corrected again), and the chain the model wrote for it
    corrects: str | None = None
    model_chain: dict | None = None

    def origin(self) -> tuple[str | None, dict | None]:
        """(the query a correction of this one corrects, the model's chain of it): this query and its
        chain, or for a corrected answer what it corrected (None, None for a chain given without a
        query id: no model's chain to compare with)."""
        if self.mode == "corrected":
            return self.corrects, self.model_chain
        return self.query_id, self.chain

    def persons_chain(self) -> dict | None:
        """The chain a person wrote, when this answer ranked one that differs from the model's (a
        correction that changed nothing is the model's chain, not a person's), else None."""
        if self.mode != "corrected" or not self.chain or not changed_sections(self.chain, self.model_chain):
            return None
        return {s: self.chain.get(s) for s in SECTIONS}


class FeedbackEvent(pydantic.BaseModel):
    query_id: str
    token: str
    chosen: str | None = None        # "this is it"
    rejected: list[str] = []         # "not this"
    none_of_these: bool = False      # nothing shown was the target
    time: float = 0.0
    # "answer" (the fields above), or "correction": a person rewrote the chain of ``query_id`` (the model's,
    # ``model_chain``) as ``chain`` and searched with it, the search answered as ``corrected_query``
    kind: Literal["answer", "correction"] = "answer"
    chain: dict | None = None
    model_chain: dict | None = None
    changed: list[str] = []          # the sections that differ from the model's
    corrected_query: str | None = None

    def answer(self) -> tuple:
        """What the person said, without when: two events that say the same are one."""
        return self.chosen, tuple(sorted(self.rejected)), self.none_of_these


def token_identity(token: str | None) -> str:
    """A stable name for a bearer token that does not reveal it."""
    return "anonymous" if not token else "t-" + hashlib.sha256(token.encode()).hexdigest()[:16]


def _publish(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists: True when this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


class FeedbackStore:
    """The feedback of one dataset under ``root`` (``<artifacts>/feedback/<dataset>``)."""

    def __init__(self, root: str | os.PathLike, dataset: str, *, ttl_s: float = DEFAULT_TTL_S):
        self.remote = "://" in str(root)     # an object-store root (s3://, gs://, any fsspec URL)
        self.root = str(root).rstrip("/") if self.remote else Path(root)
        self.dataset = dataset
        self.ttl_s = ttl_s
        if self.remote:
            self.fs, self._base = url_to_fs(self.root)

    # ---- files: a local folder, or an object store through fsspec ----------------------------

    def _read(self, rel: str) -> str:
        if self.remote:
            return self.fs.cat_file(f"{self._base}/{rel}").decode("utf-8")
        return (self.root / rel).read_text(encoding="utf-8")

    def _create(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` unless it exists: True when this call wrote it. Locally exclusive (a hard link
        that fails rather than replace); on an object store, which has no exclusive create, checked
        first, so two different answers of one token in the same instant keep the later one."""
        if not self.remote:
            return _publish(self.root / rel, data)
        if self.fs.exists(f"{self._base}/{rel}"):
            return False
        self.fs.pipe_file(f"{self._base}/{rel}", data)   # one whole object: a killed writer leaves none
        return True

    def _glob(self, pattern: str) -> list[str]:
        if self.remote:
            return sorted(p[len(self._base) + 1:] for p in self.fs.glob(f"{self._base}/{pattern}"))
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.glob(pattern))

    # ---- the service's side ------------------------------------------------------------------

    def record_query(self, *, reference: bytes, suffix: str, modification: str, model_version: str, mode: str,
                     chain: dict | None, shown: Sequence[str], scores: Sequence[float], token: str | None,
                     corrects: ShownQuery | None = None) -> str:
        """Keep what was answered; returns the new query id. ``corrects``: the query whose chain a
        person corrected to ask this one (mode ``corrected``)."""
        digest = bytes_md5(reference)
        image = Path("images") / f"{digest}{suffix}"
        self._create(image.as_posix(), reference)   # same content under the same name: a race is harmless
        query = ShownQuery(query_id=uuid.uuid4().hex, dataset=self.dataset, time=time.time(),
                           token=token_identity(token), reference_hash=digest, reference_file=image.as_posix(),
                           modification=modification, model_version=model_version, mode=mode, chain=chain,
                           shown=list(shown), scores=[float(s) for s in scores])
        if corrects is not None:
            query.corrects, query.model_chain = corrects.origin()
        self._create(f"queries/{query.query_id}.json", query.model_dump_json().encode())
        return query.query_id

    def correction_of(self, query_id: str, token: str | None, *, reference: bytes, modification: str,
                      now: float | None = None) -> ShownQuery:
        """The query a correction refers to, checked: one this service answered (404), not expired
        (410), asked by the same token (404 for another's, as if unknown) with the same reference image
        and modification (400: a correction re-ranks the same query)."""
        query = self.query(query_id)
        if query.token != token_identity(token):
            raise FeedbackError(f"unknown query {query_id}: this service answered no such query", 404)
        if (time.time() if now is None else now) - query.time > self.ttl_s:
            raise FeedbackError(f"query {query_id} has expired (corrections are taken for {self.ttl_s / 3600:g} h)",
                                410)
        if bytes_md5(reference) != query.reference_hash or " ".join(modification.split()) != " ".join(
                query.modification.split()):
            raise FeedbackError(f"query {query_id} had another reference image or modification: a correction "
                                "searches the same query with a corrected chain")
        return query

    def record_correction(self, corrected: ShownQuery, answer_id: str, token: str | None, chain: dict,
                          changed: Sequence[str]) -> FeedbackEvent:
        """Keep a correction as an event of the query it corrects (the first one when it was itself a
        correction; that answer itself when it ranked a chain given without a query id): the model's
        chain (None when there is none), the person's, which sections changed and the query id the
        corrected search was answered as."""
        original, model_chain = corrected.origin()
        event = FeedbackEvent(query_id=original or corrected.query_id, token=token_identity(token),
                              kind="correction", chain=chain, model_chain=model_chain, changed=list(changed),
                              corrected_query=answer_id, time=time.time())
        self._create(f"events/{event.query_id}/{event.token}.correction.{answer_id}.json",
                     event.model_dump_json().encode())
        return event

    def query(self, query_id: str) -> ShownQuery:
        if not QUERY_ID.match(str(query_id)):
            raise FeedbackError(f"query_id {query_id!r} is not a query id this service gave", 404)
        try:
            return ShownQuery.model_validate_json(self._read(f"queries/{query_id}.json"))
        except FileNotFoundError:
            raise FeedbackError(f"unknown query {query_id}: this service answered no such query", 404) from None

    def add(self, query_id: str, token: str | None, *, chosen: str | None = None,
            rejected: Iterable[str] = (), none_of_these: bool = False,
            now: float | None = None) -> tuple[FeedbackEvent, bool]:
        """Record a person's answer to a query this service answered. Returns ``(event, created)``:
        the same answer again is not written twice (``created`` False); a different answer from the
        same token, an id that was not shown, an empty or self-contradictory answer, an unknown or
        expired query is a :class:`FeedbackError` with its HTTP status."""
        query = self.query(query_id)
        now = time.time() if now is None else now
        if now - query.time > self.ttl_s:
            raise FeedbackError(f"query {query_id} has expired (feedback is taken for {self.ttl_s / 3600:g} h)", 410)
        rejected = sorted(set(rejected))
        if not chosen and not rejected and not none_of_these:
            raise FeedbackError("say something: a chosen id, rejected ids, or none_of_these")
        if none_of_these and chosen:
            raise FeedbackError("none_of_these contradicts a chosen id")
        if chosen and chosen in rejected:
            raise FeedbackError(f"{chosen} cannot be both chosen and rejected")
        shown = set(query.shown)
        unknown = [i for i in [*([chosen] if chosen else []), *rejected] if i not in shown]
        if unknown:
            raise FeedbackError(f"not shown for query {query_id}: {', '.join(unknown)}")
        event = FeedbackEvent(query_id=query_id, token=token_identity(token), chosen=chosen, rejected=rejected,
                              none_of_these=none_of_these, time=now)
        path = f"events/{query_id}/{event.token}.json"
        if self._create(path, event.model_dump_json().encode()):
            return event, True
        before = FeedbackEvent.model_validate_json(self._read(path))
        if before.answer() == event.answer():
            return before, False
        raise FeedbackError(f"this token already answered query {query_id} differently", 409)

    # ---- the pipeline's side -----------------------------------------------------------------

    def events(self) -> list[FeedbackEvent]:
        """Every stored event, oldest first (temporary files of a killed writer are not events)."""
        out = []
        for path in self._glob("events/*/*.json"):
            with contextlib.suppress(FileNotFoundError):
                out.append(FeedbackEvent.model_validate_json(self._read(path)))
        return sorted(out, key=lambda e: (e.time, e.query_id, e.token))

    def queries(self) -> dict[str, ShownQuery]:
        out = {}
        for path in self._glob("queries/*.json"):
            q = ShownQuery.model_validate_json(self._read(path))
            out[q.query_id] = q
        return out


def collect_triplets(store: FeedbackStore, *, gallery: dict[str, str], held_out_ids: set[str],
                     held_out_hashes: set[str], known_hashes: dict[str, str] | None = None,
                     cap_per_token: int = 100) -> tuple[list[dict], list[dict], dict]:
    """Training triplets from ``store``'s events: ``(triplets, images, report)``.

    ``gallery``: id -> split of every image the service could show; ``held_out_ids`` /
    ``held_out_hashes``: the ids and content hashes of every image outside the train split (the
    leakage guard: a query whose reference or target is one of them never becomes training data, so
    a test split never sees feedback); the triplets are of the train split;
    ``known_hashes``: content hash -> id of the benchmark's own images (a reference that is one of
    them is named by its id, else by its hash, ``fb-<md5>``). Rows follow the triplets table's
    columns (``model_code.data.tables``) and carry ``person_chain``: the chain a person wrote, for a
    pick on a corrected search (else None); ``images`` are the references that are new images.
    Corrections are counted (``corrections``), not triplets by themselves."""
    if store.remote:
        raise ValueError("collect triplets from a local copy of the feedback (an object-store root is fetched first)")
    queries = store.queries()
    known_hashes = known_hashes or {}
    triplets, images, seen, per_token = [], {}, set(), {}
    report = {"events": 0, "accepted": 0, "none_of_these": 0, "rejected_only": 0, "leak": 0, "duplicate": 0,
              "over_cap": 0, "unknown": 0, "corrections": 0, "person_chains": 0}
    for event in store.events():
        if event.kind == "correction":   # kept for what it says; a pick on the corrected search is the triplet
            report["corrections"] += 1
            continue
        report["events"] += 1
        if event.none_of_these or not event.chosen:
            report["none_of_these" if event.none_of_these else "rejected_only"] += 1
            continue
        query = queries.get(event.query_id)
        if query is None or event.chosen not in gallery:
            report["unknown"] += 1
            continue
        if (query.reference_hash in held_out_hashes or event.chosen in held_out_ids
                or known_hashes.get(query.reference_hash) in held_out_ids):
            report["leak"] += 1
            continue
        key = (query.reference_hash, " ".join(query.modification.lower().split()), event.chosen)
        if key in seen:
            report["duplicate"] += 1
            continue
        if per_token.get(event.token, 0) >= cap_per_token:
            report["over_cap"] += 1
            continue
        seen.add(key)
        per_token[event.token] = per_token.get(event.token, 0) + 1
        reference = known_hashes.get(query.reference_hash) or f"fb-{query.reference_hash}"
        if reference not in gallery and reference not in images:
            images[reference] = {"image_id": reference, "dataset": store.dataset, "split": "train",
                                 "path": str(store.root / query.reference_file), "category": None}
        negatives = [i for i in event.rejected if i in gallery and i not in held_out_ids]
        person = query.persons_chain()
        triplets.append({"query_id": f"fb-{event.query_id}-{event.token}", "dataset": store.dataset,
                         "split": "train", "category": None, "reference_id": reference,
                         "modification": query.modification, "target_ids": [event.chosen], "subset_ids": [],
                         "shared_concept": None, "n_edits": None, "reference_dependent": None,
                         "hard_negative_ids": negatives, "token": event.token, "model_version": query.model_version,
                         # a pick on a corrected search: the person's chain is this triplet's annotation
                         "person_chain": person})
        report["accepted"] += 1
        report["person_chains"] += person is not None
    return triplets, list(images.values()), report


def online_metrics(store: FeedbackStore) -> dict[str, dict[str, float]]:
    """Per model version: answered queries, the share whose pick was at rank 1 and within the top 10,
    and the rate of "none of these" (an online figure beside the offline benchmark's). Answers to a
    corrected search are left out: that ranking is the person's chain's, not the model's."""
    queries = store.queries()
    out: dict[str, dict[str, float]] = {}
    for event in store.events():
        query = queries.get(event.query_id)
        if query is None or query.mode == "corrected" or not (event.chosen or event.none_of_these):
            continue
        m = out.setdefault(query.model_version, {"answered": 0, "pick_at_1": 0, "pick_in_10": 0, "none_of_these": 0})
        m["answered"] += 1
        if event.none_of_these:
            m["none_of_these"] += 1
        else:
            rank = query.shown.index(event.chosen) + 1
            m["pick_at_1"] += rank == 1
            m["pick_in_10"] += rank <= 10
    for m in out.values():
        n = m["answered"]
        for k in ("pick_at_1", "pick_in_10", "none_of_these"):
            m[k] = m[k] / n
    return out
