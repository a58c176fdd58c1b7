"""The annotations table (docs/architecture.md §4), stored so that it survives interruption.

Rows are keyed by (``content_key``, ``teacher``, ``prompt_version``), where the content key is a
hash of what the teacher was shown: the reference image's bytes, the target image's bytes and the
modification text. Query ids are positional in some benchmarks (cir-shapes, FashionIQ), so a key by
id would hand a regenerated or re-released dataset the chains of the old scenes; a key by content
re-annotates exactly the queries whose content changed. ``AnnotationStore`` appends each finished
chunk as its own Parquet part, written under a temporary name and published without overwriting
anything: a crash loses at most the chunk in flight, never a stored row, and several writers may
share a store. ``annotate_missing`` asks the annotator only for the
keys the store lacks, so an interrupted run resumes where it stopped, a re-run annotates nothing
new, and a new prompt version (a new key) re-annotates everything. :meth:`AnnotationStore.view`
gives the rows of a set of requests under the requests' current query ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic

from model_code.annotation.judge import UNKNOWN_QUERY, Annotation, AnnotationRequest, Annotator
from model_code.common import FileDigests, atomic_path
from model_code.data import nulls_as_none
from model_code.data.tables import image_paths
from model_code.records import Record

log = logging.getLogger(__name__)

ANNOTATION_COLUMNS = ["query_id", "teacher", "prompt_version", "caption", "reasoning", "conclusion", "raw",
                      "status", "reject_reason", "repairs", "content_key"]
KEY = ["content_key", "teacher", "prompt_version"]
# Rejections that say something about a query's id, not its content: an annotator that knows queries
# by id (the oracle) was asked about one it does not know (a feedback triplet, say). Stored under the
# content key, such a row would stand for every query with the same images and text, and a benchmark
# query of that content would never be annotated; so it is returned but not stored.
ID_REJECTIONS = frozenset({UNKNOWN_QUERY})


def _schema():
    return pa.schema([(c, pa.string()) for c in ANNOTATION_COLUMNS])


class AnnotationStore:
    """Annotation rows under ``root`` as Parquet parts, one per stored chunk.

    Safe for several writers at once (two annotation runs on one store): every part has a name of
    its own (``part-<time ns>-<pid>-<random>.parquet``, ordered by time) and is published by a hard
    link that fails rather than replace an existing file, so no writer overwrites another's rows.
    A part that cannot be read (truncated, empty, not Parquet, another table's columns, a folder) is
    moved aside into ``quarantine/`` with a warning naming it; its rows are then missing, so the next
    run annotates them again."""

    STALE_TMP_S = 3600  # a temporary file this old is a crashed writer's, not a live one's

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.quarantined: list[Path] = []
        now = time.time()
        for stale in self.root.glob(".*.tmp"):  # a part whose write was interrupted long ago
            with contextlib.suppress(FileNotFoundError):
                if now - stale.stat().st_mtime > self.STALE_TMP_S:
                    stale.unlink()

    def parts(self) -> list[Path]:
        """The part files, oldest first (anything else named like a part, e.g. a folder, is read as an
        unusable part and quarantined)."""
        return sorted(self.root.glob("part-*.parquet"))

    def _publish(self, table, name: str) -> Path:
        """Write ``table`` as the part ``name``, never replacing an existing file."""
        path = self.root / name
        tmp = self.root / f".{name}.tmp"
        pq.write_table(table, tmp)
        try:
            os.link(tmp, path)  # fails with FileExistsError instead of overwriting
        finally:
            tmp.unlink()
        return path

    @staticmethod
    def _part_name(stamp: int | None = None) -> str:
        stamp = time.time_ns() if stamp is None else stamp
        return f"part-{stamp:020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"

    def append(self, rows: Sequence[Annotation]) -> Path | None:
        if not rows:
            return None
        if any(not r.content_key for r in rows):
            raise ValueError("annotation rows need the content key of their request (see annotate_missing)")
        table = pa.Table.from_pylist([{c: getattr(r, c) for c in ANNOTATION_COLUMNS} for r in rows], schema=_schema())
        return self._publish(table, self._part_name())

    def _read_parts(self) -> tuple[list[Path], list[pd.DataFrame]]:
        """The readable parts and their rows; unreadable ones are quarantined."""
        read, frames = [], []
        for part in self.parts():
            try:
                if not part.is_file():
                    raise IsADirectoryError("not a file")
                table = pq.read_table(part)
                missing = sorted(set(ANNOTATION_COLUMNS) - {"content_key"} - set(table.column_names))
                if missing:   # another table's file: its rows would read as empty annotations
                    raise ValueError(f"not an annotation part (no column {', '.join(missing)})")
                frames.append(table.to_pandas())
                read.append(part)
            except FileNotFoundError:
                continue  # compacted away by another process meanwhile: its rows are in the new part
            except Exception as e:  # noqa: BLE001 - any reader error means the file is not a usable part
                quarantine = self.root / "quarantine"
                quarantine.mkdir(exist_ok=True)
                target = quarantine / part.name
                if target.exists():
                    target = quarantine / f"{part.name}.{uuid.uuid4().hex[:8]}"
                with contextlib.suppress(FileNotFoundError):
                    part.rename(target)
                    self.quarantined.append(target)
                log.warning("annotation store %s: part %s is unreadable (%s: %s); moved to %s, and its queries "
                            "will be annotated again", self.root, part.name, type(e).__name__, e, target)
        return read, frames

    def table(self, teacher: str | None = None, prompt_version: str | None = None) -> pd.DataFrame:
        """All rows (the latest per key), optionally of one teacher and prompt version."""
        _, frames = self._read_parts()
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in ANNOTATION_COLUMNS})
        df = pd.concat(frames, ignore_index=True)
        df = nulls_as_none(df.reindex(columns=ANNOTATION_COLUMNS))  # parts from before content keys: never matched
        if teacher is not None:
            df = df[df.teacher == teacher]
        if prompt_version is not None:
            df = df[df.prompt_version == prompt_version]
        return df.drop_duplicates(KEY, keep="last").reset_index(drop=True)

    def done(self, teacher: str, prompt_version: str) -> set[str]:
        """The content keys stored for this teacher and prompt version."""
        return set(self.table(teacher, prompt_version).content_key.dropna())

    def view(self, requests: Sequence[AnnotationRequest], teacher: str, prompt_version: str) -> pd.DataFrame:
        """The stored rows of ``requests`` (matched by content key), each under its request's query
        id, in request order; requests without a stored row are left out."""
        rows = self.table(teacher, prompt_version).set_index("content_key", drop=False)
        keep = [r for r in requests if r.content_key in rows.index]
        out = rows.loc[[r.content_key for r in keep]].reset_index(drop=True)
        out["query_id"] = [r.query_id for r in keep]
        return out[ANNOTATION_COLUMNS]

    def compact(self) -> None:
        """Rewrite the parts as one (the latest row per key); safe to interrupt, and to run beside
        writers: the new part sorts right after the newest part it read, and only the parts it read
        are removed."""
        parts, frames = self._read_parts()
        if len(parts) < 2:
            return
        df = nulls_as_none(pd.concat(frames, ignore_index=True).reindex(columns=ANNOTATION_COLUMNS))
        df = df.drop_duplicates(KEY, keep="last")
        newest = int(parts[-1].name.split("-")[1].split(".")[0])
        self._publish(pa.Table.from_pandas(df[ANNOTATION_COLUMNS], schema=_schema(), preserve_index=False),
                      self._part_name(newest + 1))
        for p in parts:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def write_annotations(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """One Parquet file of annotation rows (atomically replaced)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pandas(table[ANNOTATION_COLUMNS], schema=_schema(), preserve_index=False), tmp)
    return path


def read_annotations(path: str | os.PathLike) -> pd.DataFrame:
    df = pd.read_parquet(path)
    return nulls_as_none(df)


def annotation_version(df: pd.DataFrame) -> str:
    """A content hash of annotation rows, independent of row order: their data version."""
    h = hashlib.md5()
    cell = lambda v: "" if v is None or v != v else str(v)  # noqa: E731 - None and NaN alike
    rows = (tuple(cell(v) for v in row) for row in df[ANNOTATION_COLUMNS].itertuples(index=False, name=None))
    for row in sorted(rows):
        h.update("\x1f".join(row).encode())
        h.update(b"\x1e")
    return h.hexdigest()


@dataclasses.dataclass
class RunStats:
    requested: int = 0
    already_done: int = 0
    annotated: int = 0
    ok: int = 0
    rejected: int = 0
    failed: int = 0
    unknown: int = 0          # rejected for an id the annotator does not know (not stored: ID_REJECTIONS)
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.annotated / self.seconds if self.seconds else 0.0


def annotate_missing(store: AnnotationStore, annotator: Annotator, requests: Sequence[AnnotationRequest], *,
                     chunk_size: int = 256, progress: Callable[[str], None] | None = None,
                     progress_every_s: float = 10.0) -> RunStats:
    """Annotate the requests the store has no row for (this teacher, this prompt version), a chunk
    at a time, storing each chunk before the next. Logs progress with rate and ETA. A rejection of a
    query's id rather than its content (``ID_REJECTIONS``) is counted (``unknown``) but not stored:
    the next run asks again."""
    say = progress or log.info
    if any(not r.content_key for r in requests):
        raise ValueError("annotation requests need a content key (build them with annotation_requests)")
    done = store.done(annotator.name, annotator.prompt_version)
    todo = list({r.content_key: r for r in requests if r.content_key not in done}.values())
    stats = RunStats(requested=len(requests), already_done=len(requests) - len(todo))
    say(f"{annotator.name} ({annotator.prompt_version}): {len(todo)} to annotate, {stats.already_done} already stored")
    start = last = time.monotonic()
    for i in range(0, len(todo), chunk_size):
        chunk = todo[i: i + chunk_size]
        results = annotator.annotate(chunk)
        answered = [dataclasses.replace(a, content_key=r.content_key) for r, a in zip(chunk, results) if a is not None]
        rows = [a for a in answered if a.reject_reason not in ID_REJECTIONS]
        store.append(rows)
        stats.annotated += len(rows)
        stats.unknown += len(answered) - len(rows)
        stats.failed += len(results) - len(answered)
        stats.ok += sum(a.ok for a in rows)
        stats.rejected += sum(not a.ok for a in rows)
        now = time.monotonic()
        finished = i + len(chunk)
        if now - last >= progress_every_s or finished == len(todo):
            last = now
            rate = finished / (now - start)
            say(f"annotated {finished}/{len(todo)} ({rate:.1f}/s, ETA {(len(todo) - finished) / rate:.0f}s; "
                f"ok {stats.ok}, rejected {stats.rejected}, failed {stats.failed}"
                + (f", unknown to the annotator {stats.unknown}" if stats.unknown else "") + ")")
    stats.seconds = time.monotonic() - start
    return stats


def annotation_requests(triplets: pd.DataFrame, images: pd.DataFrame, root: str | os.PathLike,
                        splits: Sequence[str] | None = None, limit: int | None = None) -> list[AnnotationRequest]:
    """One request per query with a known target (the first one when there are several), in the
    given splits (default: all), at most ``limit``. The teacher sees the reference and that target;
    the request's content key hashes both images' bytes and the text."""
    root = Path(root)
    digest = FileDigests()

    rows = triplets if splits is None else triplets[triplets["split"].isin(list(splits))]
    paths = image_paths(images)
    out = []
    for q, split, ref, targets, text in zip(rows["query_id"], rows["split"], rows["reference_id"],
                                            rows["target_ids"], rows["modification"]):
        if not len(targets):
            continue  # a hidden split: nothing to show the teacher
        ref_path, target_path = root / paths[(split, ref)], root / paths[(split, targets[0])]
        key = hashlib.md5("\x1f".join((digest(ref_path), digest(target_path), text)).encode()).hexdigest()
        out.append(AnnotationRequest(q, ref_path, target_path, text, key))
        if limit is not None and len(out) >= limit:
            break
    return out


class AnnotationsRecord(Record):
    """What the ``cot_annotations`` stage hands on (``meta.json`` beside ``annotations.parquet``)."""

    dataset: str
    path: str                   # annotations.parquet: the accepted and rejected rows of this dataset's queries
    teacher: str
    prompt_version: str
    version: str                # content hash of the rows
    raw_version: str            # the raw data they were made from
    min_acceptance: float = 1.0
    splits: list = pydantic.Field(default_factory=list)
    ok: int = 0
    rejected: int = 0
