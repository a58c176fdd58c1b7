"""Small things every stage uses, written once: atomic writes, content hashes, a progress line.

- :func:`atomic_path` / :func:`atomic_write_text` / :func:`atomic_write_json`: a file is written
  under a temporary name and renamed into place, so a reader (or a crash) never sees half of it.
- :func:`replace_dir`: the same for a folder built beside its destination.
- :func:`writing`: a write that fails on a full disk says so, naming the path, and leaves no
  temporary file or folder behind.
- :func:`file_md5`, :func:`content_hash`, :func:`json_key`: versions from bytes, never from paths.
- :class:`Progress`: count, rate and ETA of a long loop, at most every few seconds.

The typed records one stage hands the next are in :mod:`model_code.records` (pydantic, which this
module does not import: the pretraining runs where pydantic is not installed).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write it in the block; on success it replaces
    ``path`` in one rename, on an exception it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


DISK_FULL_BELOW = 64 << 20   # free bytes under which a failed write is put down to a full disk


class DiskFullError(OSError):
    """A write failed because the disk holding its path is full (the message names the path)."""


@contextlib.contextmanager
def writing(path: str | os.PathLike, *temporaries: str | os.PathLike) -> Iterator[None]:
    """Guard a write under ``path``: on any failure, remove ``temporaries`` (files or folders) and, when
    the disk holding ``path`` is (nearly) full, raise :class:`DiskFullError` naming the path and the
    free space instead of the writer's own message (torch's zip writer says "enforce fail at
    inline_container.cc"; safetensors and pyarrow have theirs)."""
    try:
        yield
    except BaseException as e:
        for t in temporaries:
            t = Path(t)
            if t.is_dir():
                shutil.rmtree(t, ignore_errors=True)
            elif t.exists():
                t.unlink()
        probe = Path(path)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if isinstance(e, Exception) and (free < DISK_FULL_BELOW or getattr(e, "errno", None) == errno.ENOSPC):
            raise DiskFullError(errno.ENOSPC, f"no space left on the device holding {path} ({free >> 20} MB free): "
                                              f"free some space and run again (nothing was replaced)") from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int | None = 1, **kwargs) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs) + ("\n" if indent is not None else ""))


def replace_dir(built: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Put the finished folder ``built`` at ``path``, replacing what was there. The old folder is
    moved aside under a name of this call's own and removed last, so a crash leaves the old or the
    new one, never neither, and nothing but the old folder is ever removed."""
    built, path = Path(built), Path(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    if path.exists():
        path.rename(old)
    built.rename(path)
    if old.exists():
        shutil.rmtree(old)
    return path


# ---------------------------------------------------------------------------------------------
# versions from content


def bytes_md5(data: bytes) -> str:
    """The md5 of ``data``: an image's identity by content (the gallery index, the feedback store and
    the leakage guard all name an image by it, so they must agree: :func:`file_md5` of its file)."""
    return hashlib.md5(data).hexdigest()


def file_md5(*paths: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """md5 over the bytes of ``paths`` in order (streamed: large weight files are fine)."""
    h = hashlib.md5()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


class FileDigests:
    """``digests(path)``: the md5 of a file's bytes, each file read once (galleries and queries
    name the same images many times)."""

    def __init__(self):
        self.seen: dict[Path, str] = {}

    def __call__(self, path: str | os.PathLike) -> str:
        path = Path(path)
        if path not in self.seen:
            self.seen[path] = file_md5(path)
        return self.seen[path]


def content_hash(files: Iterable[str | os.PathLike], root: str | os.PathLike) -> str:
    """md5 over (path relative to ``root``, file md5) of ``files``: a version for data that DVC does
    not track."""
    root = Path(root)
    h = hashlib.md5()
    for f in sorted(Path(f) for f in files):
        h.update(str(f.relative_to(root)).encode())
        h.update(file_md5(f).encode())
    return h.hexdigest()


def json_key(*parts, length: int = 12) -> str:
    """A short stable key for JSON-able values (run folders keyed by their inputs)."""
    return hashlib.md5(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]


# ---------------------------------------------------------------------------------------------
# progress


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
