"""The gallery index: a dataset's gallery embedded by a model, in LanceDB, searched exactly or by ANN.

One LanceDB table per dataset (``gallery_<dataset>``) under a URI (default ``<artifacts>/lancedb``;
any LanceDB URI, e.g. ``s3://bucket/path``), with columns ``image_id``, ``dataset``, ``split``,
``path``, ``md5`` (the image file's content hash) and ``fingerprint`` (its pixels in brief, see
:class:`SamePicture`: the service finds an uploaded reference by either, re-encoded or resized),
``vector`` (fixed-size float32, L2-normalised) and ``model_version``. A table made before ``md5`` or
``fingerprint`` existed is rebuilt by the next build, and read meanwhile with them computed from its paths.

Versions follow the model. A build for model ``v`` embeds the images the table's newest version
lacks for ``v`` (so an interrupted build resumes, and a grown catalogue embeds only its new images),
then drops the rows of other models and tags the resulting table version ``model-<v>``. Search
reads the version tagged with the model it is asked for, so rolling the model back is a checkout of
the index, without embedding anything again.

Search: below ``exact_below`` rows the vectors are read into memory and ranked by a matrix product
(:func:`exact_topk`, also what the evaluation ranks with, so the two agree by construction); above
it an ANN index (IVF_RQ by default, cosine, with a refine step re-ranking candidates by their full
vectors) is built with the table version and searched. A per-query exclusion (CIRR and cir-shapes
drop the reference) is a prefilter: ``k`` results always come back.

Checks (the ``index_recall`` asset check): :meth:`GalleryIndex.agreement` compares the stored
vectors with embeddings made now by the model (a build from another model, or vectors changed after
the build, fail it); :meth:`GalleryIndex.recall_against_exact` measures what an ANN index loses
against exact search, whenever the version has one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from filelock import FileLock, Timeout
from PIL import Image

from model_code.common import Progress, bytes_md5, file_md5

log = logging.getLogger(__name__)

DEFAULT_EXACT_BELOW = 50_000          # rows: exact in-memory search below, ANN at or above
NORM_TOLERANCE = 1e-3


SHARED_SCHEMES = ("s3", "gs", "az")   # object stores LanceDB opens itself


def index_uri(artifacts_root: str, override: str | None = None, local_copy: str | os.PathLike | None = None) -> str:
    """Where the gallery indexes live, for the pipeline and the service alike: ``override`` when set
    (``CIRCOT_INDEX_URI``); under an artifacts root on an object store LanceDB opens (s3, gs, az),
    ``<root>/lancedb`` as a URI; else ``lancedb`` in the local root, or in ``local_copy`` (the local
    copy the pipeline works in for other remote roots, e.g. ``memory://``)."""
    if override:
        return override
    if "://" in artifacts_root:
        if artifacts_root.split("://", 1)[0] in SHARED_SCHEMES:
            return f"{artifacts_root.rstrip('/')}/lancedb"
        if local_copy is None:
            raise GalleryIndexError(f"the artifacts root {artifacts_root} is not a store LanceDB opens "
                                    f"({', '.join(SHARED_SCHEMES)}): set CIRCOT_INDEX_URI to the index's URI")
    return str(Path(local_copy or artifacts_root).expanduser() / "lancedb")


class GalleryIndexError(ValueError):
    """A bad query, an index that does not exist, a build that cannot go on: the message says which."""


def _file_hash(path) -> str | None:
    """An image's identity by content (``model_code.common.file_md5``), None when it cannot be read."""
    try:
        return file_md5(path)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# the same picture, whatever its file: an uploaded reference found in the gallery by its pixels

FINGERPRINT_SIDE = 16       # a fingerprint: the picture's mean colour over a 16 x 16 grid (768 bytes)
COARSE_SAME = 3.0           # fingerprints closer than this (mean absolute difference, of 255) are compared finely
FINE_SIDE = 32              # ... over a 32 x 32 grid of mean colours,
FINE_SAME = 56              # ... and are one picture when no cell differs by more than this (of 255)


def _grid(image: Image.Image, side: int) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((side, side), Image.BOX), dtype=np.int16)


def fingerprint(image: Image.Image) -> bytes:
    """A picture in brief: its RGB area averages over a 16 x 16 grid, whatever its size or encoding."""
    return _grid(image, FINGERPRINT_SIDE).astype(np.uint8).tobytes()


def _file_fingerprint(source) -> bytes | None:
    """The fingerprint of an image (a path or a file object), None when it cannot be read as one."""
    try:
        with Image.open(source) as im:
            return fingerprint(im)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _file_identity(path) -> tuple[str | None, bytes | None]:
    """An image file's md5 and fingerprint from one read of its bytes (None for what cannot be read)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, None
    return bytes_md5(data), _file_fingerprint(io.BytesIO(data))


def picture_distance(upload: Image.Image, gallery: Image.Image) -> int:
    """How far an uploaded picture is from a gallery image, whatever their files: the upload brought
    to the gallery image's size, the largest difference of one colour channel in one cell of a 32 x 32
    grid of area averages (0-255)."""
    upload = upload.convert("RGB")
    if upload.size != gallery.size:
        upload = upload.resize(gallery.size, Image.BICUBIC)
    return int(np.abs(_grid(upload, FINE_SIDE) - _grid(gallery, FINE_SIDE)).max())


class SamePicture:
    """Which gallery images an uploaded picture is, by content rather than by bytes: the same picture
    saved again (another PNG compression, JPEG at quality 75 or more) or resized (a few pixels, or
    by half or double) is found; a distinct picture never is. Two steps: the gallery's fingerprints
    whose mean difference from the upload's is under ``COARSE_SAME`` are candidates, and a candidate
    is the same picture when its :func:`picture_distance` from the upload is at most ``FINE_SAME``.
    Measured on the cir-shapes test gallery (2,000 images of 128 px; ``bench/same_picture.py``):
    distinct images whose fingerprints are close are 66 or more apart (the closest two colours of the
    palette, yellow and orange, differ by 66 in green), every re-encoding and resizing 35 at most. At
    64 px (the tests' gallery) JPEG at quality 95 is 49 at most, resized by a few pixels 33, halved
    50, but JPEG at quality 75 up to 87: found only from 128 px."""

    def __init__(self, ids: Sequence[str], prints: Sequence[bytes | None], paths: dict[str, Path]):
        kept = [(i, p) for i, p in zip(ids, prints) if p is not None]
        self.ids = [i for i, _ in kept]
        self.prints = (np.frombuffer(b"".join(p for _, p in kept), dtype=np.uint8).reshape(len(kept), -1)
                       if kept else np.zeros((0, 3 * FINGERPRINT_SIDE ** 2), dtype=np.uint8))
        self.paths = paths

    def __len__(self) -> int:
        return len(self.ids)

    def matches(self, image: Image.Image) -> list[str]:
        """The ids of the gallery images that are ``image``'s picture."""
        if not self.ids:
            return []
        mine = np.frombuffer(fingerprint(image), dtype=np.uint8).astype(np.int16)
        near = []
        for start in range(0, len(self.ids), 4096):   # in blocks: a few MB at a time, whatever the gallery
            block = np.abs(self.prints[start:start + 4096].astype(np.int16) - mine).mean(axis=1)
            near += (np.flatnonzero(block < COARSE_SAME) + start).tolist()
        out = []
        for j in near:
            try:
                with Image.open(self.paths[self.ids[j]]) as theirs:
                    same = picture_distance(image, theirs) <= FINE_SAME
            except (OSError, ValueError, KeyError):
                continue
            if same:
                out.append(self.ids[j])
        return out


# ---------------------------------------------------------------------------------------------
# exact search: the one ranking the evaluation and the index share


def exact_topk(queries, vectors, ids: Sequence[str], k: int | None = None, *,
               exclude: Sequence[Iterable[str]] | None = None) -> tuple[list[list[str]], list[list[float]]]:
    """Gallery ids and cosine scores per query, highest first, ties in gallery order, over
    L2-normalised ``vectors`` [n, d] (the dot product); ids in ``exclude[i]`` are removed from query
    i's candidates before ranking, so ``k`` results come back while ``k`` <= n minus those (``k``
    None: the whole ranking)."""
    import torch

    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    g = torch.as_tensor(np.array(vectors, dtype=np.float32))
    if g.shape[0] != len(ids):
        raise ValueError(f"{g.shape[0]} gallery embeddings but {len(ids)} ids")
    scores = q @ g.T                                               # [queries, gallery]
    if exclude is not None:
        position = {i: j for j, i in enumerate(ids)}
        for row, banned in enumerate(exclude):
            cols = [position[b] for b in banned if b in position]
            if cols:
                scores[row, cols] = float("-inf")
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    out_ids, out_scores = [], []
    for row in range(q.shape[0]):
        keep = order.values[row] > float("-inf")
        idx = order.indices[row][keep][:k].tolist()
        out_ids.append([ids[j] for j in idx])
        out_scores.append(order.values[row][keep][:k].tolist())
    return out_ids, out_scores


# ---------------------------------------------------------------------------------------------
# the LanceDB index


@dataclasses.dataclass
class GalleryImage:
    image_id: str
    split: str
    path: Path


@dataclasses.dataclass
class IndexInfo:
    """What a build made: the asset's metadata."""

    dataset: str
    table: str
    model_version: str
    tag: str
    table_version: int
    rows: int
    dimension: int
    embedded: int                 # images embedded by this build (0: everything was there)
    skipped: list[str]            # image ids left out as unreadable (on_bad_image="skip")
    index_type: str               # "exact" or the ANN index type
    index_params: dict
    seconds: float
    images_per_s: float


@dataclasses.dataclass
class VectorAgreement:
    """Stored vectors against the model's embeddings of the same images (:meth:`GalleryIndex.agreement`)."""

    compared: int                 # images asked about
    missing: list[str]            # ... with no stored vector
    differ: list[str]             # ... whose stored vector is below the cosine asked for (all, in another space)
    min_cosine: float             # the lowest cosine between a stored vector and the model's (nan: none compared)
    max_abs_difference: float     # the largest difference of one component
    other_space: str              # why no vector could be compared (another dimension), else ""


@dataclasses.dataclass
class AnnConfig:
    """The ANN index built at or above ``exact_below`` rows, and how it is searched (chosen by
    bench/index_scale.py; docs/experiments/2026-11-27-index-scale.md has the figures)."""

    index_type: str = "IVF_RQ"            # on 1M vectors: IVF_PQ's recall and latency, built 2.5x faster
    num_partitions: int | None = None     # None: about sqrt(rows)
    num_sub_vectors: int | None = None    # None: dimension / 8
    nprobes: int = 32                     # 16 gave the same recall at 1M: the PQ codes, not the probes, limit it
    refine_factor: int = 30               # re-rank 30 x k candidates by their full vectors: recall 0.87 -> 0.99

    def build_params(self, rows: int, dim: int) -> dict:
        params = {"distance_type": "cosine", "index_type": self.index_type,
                  "num_partitions": self.num_partitions or max(1, int(rows ** 0.5))}
        if "PQ" in self.index_type:
            params["num_sub_vectors"] = self.num_sub_vectors or max(1, dim // 8)
        return params

    def create(self, table, rows: int, dim: int) -> dict:
        """Build the ANN index on ``table``'s vectors; returns its parameters."""
        from lancedb.index import HnswSq, IvfPq, IvfRq

        params = self.build_params(rows, dim)
        kind = {"IVF_PQ": IvfPq, "IVF_HNSW_SQ": HnswSq, "IVF_RQ": IvfRq}.get(self.index_type)
        if kind is None:
            raise GalleryIndexError(f"unknown ANN index type {self.index_type!r}: IVF_PQ, IVF_HNSW_SQ or IVF_RQ")
        table.create_index("vector", replace=True,
                           config=kind(**{k: v for k, v in params.items() if k != "index_type"}))
        return {**params, "nprobes": self.nprobes, "refine_factor": self.refine_factor}


class GalleryIndex:
    def __init__(self, uri: str | os.PathLike, dataset: str, *, exact_below: int = DEFAULT_EXACT_BELOW,
                 ann: AnnConfig | None = None, lock_timeout_s: float = 0.0):
        import lancedb

        self.uri, self.dataset = str(uri), dataset
        self.table_name = f"gallery_{dataset}"
        self.exact_below, self.ann = exact_below, ann or AnnConfig()
        self.lock_timeout_s = lock_timeout_s  # how long a build waits for another build of the table
        if "://" not in self.uri:
            Path(self.uri).mkdir(parents=True, exist_ok=True)
        self.db = lancedb.connect(self.uri)
        self._cache: dict[int, tuple[list[str], np.ndarray]] = {}

    @staticmethod
    def tag(model_version: str) -> str:
        return f"model-{model_version}"

    def _open(self):
        try:
            return self.db.open_table(self.table_name)
        except (ValueError, FileNotFoundError):
            return None
        except Exception as e:  # noqa: BLE001 - e.g. a manifest that cannot be read
            if not (Path(self.uri) / f"{self.table_name}.lance").exists() and "://" not in self.uri:
                return None
            raise self._damaged(e) from None

    def versions(self) -> dict[str, int]:
        """Model version -> table version, for every model the index was built with."""
        table = self._open()
        if table is None:
            return {}
        try:
            tags = table.tags.list()
        except Exception as e:  # noqa: BLE001 - lance raises many kinds: one clear error instead
            raise self._damaged(e) from None
        return {name[len("model-"):]: int(v["version"] if isinstance(v, dict) else v.version)
                for name, v in tags.items() if name.startswith("model-")}

    def _damaged(self, error: Exception) -> GalleryIndexError:
        return GalleryIndexError(f"the gallery index {self.table_name} at {self.uri} is damaged "
                                 f"({type(error).__name__}: {str(error)[:300]}); it is derived data: the next run of "
                                 f"the gallery_index asset rebuilds it from the production model")

    def check(self) -> None:
        """Read every part of the table (its tags, each tagged version's rows): a GalleryIndexError
        saying it is damaged when any cannot be read."""
        table = self._open()
        if table is None:
            return
        try:
            for version in self.versions().values():
                table.checkout(version)
                table.to_arrow()
            table.checkout_latest()
            table.to_arrow()
        except GalleryIndexError:
            raise
        except Exception as e:  # noqa: BLE001 - lance raises many kinds: one clear error instead
            raise self._damaged(e) from None

    def _drop_damaged(self, say: Callable[[str], None]) -> None:
        """Remove a table that cannot be read (derived data: rebuilt next)."""
        try:
            self.check()
            return
        except GalleryIndexError as e:
            say(f"{e}: removing it to rebuild")
        try:
            self.db.drop_table(self.table_name)
        except Exception:  # noqa: BLE001 - a manifest too damaged to drop: remove its folder
            if "://" in self.uri:
                raise

            shutil.rmtree(Path(self.uri) / f"{self.table_name}.lance", ignore_errors=True)
        self._cache.clear()

    # ---- building ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _build_lock(self):
        """One build of a table at a time on a local folder (object stores rely on the orchestrator):
        an OS lock on ``.<table>.build.lock``, which the OS drops when its holder ends, so the lock of
        a build that was killed never blocks the next one. Another build waits ``lock_timeout_s``
        at most for it, then gets a GalleryIndexError naming the lock."""
        if "://" in self.uri:
            yield
            return
        path = Path(self.uri) / f".{self.table_name}.build.lock"
        lock = FileLock(path, timeout=self.lock_timeout_s)
        try:
            lock.acquire()
        except Timeout:
            waited = f" (waited {self.lock_timeout_s:g} s)" if self.lock_timeout_s > 0 else ""
            raise GalleryIndexError(f"another build of {self.table_name} is running: it holds the lock {path}"
                                    f"{waited}; wait for it to finish") from None
        try:
            yield
        finally:
            lock.release()

    def _rows_of(self, table, model_version: str) -> set[str]:
        if table is None or table.count_rows() == 0:
            return set()
        found = (table.search().where(f"model_version = '{_quote(model_version)}'").select(["image_id"])
                 .limit(table.count_rows()).to_arrow())
        return set(found.column("image_id").to_pylist())

    def build(self, embed: Callable[[list[Path]], object], images: Sequence[GalleryImage], *, model_version: str,
              batch_size: int = 64, on_bad_image: str = "fail",
              progress: Callable[[str], None] | None = None) -> IndexInfo:
        """Embed ``images`` with ``embed`` (paths -> L2-normalised [n, d]) into the table, resuming
        an interrupted build and embedding only images the table lacks for ``model_version``; then
        keep only this model's rows, index them, and tag the version. ``on_bad_image``: ``fail``
        (a GalleryIndexError naming the image) or ``skip`` (left out, listed in the result)."""


        if on_bad_image not in ("fail", "skip"):
            raise GalleryIndexError(f"on_bad_image must be 'fail' or 'skip', not {on_bad_image!r}")
        images = list({im.image_id: im for im in images}.values())
        if not images:
            raise GalleryIndexError(f"{self.dataset}: no gallery images to index")
        start = time.monotonic()
        with self._build_lock():
            say = progress or log.info
            self._drop_damaged(say)
            table = self._open()
            if table is not None and not {"md5", "fingerprint"} <= set(table.schema.names):
                say(f"gallery index {self.table_name} was built before content hashes and fingerprints: "
                    "rebuilding it")
                self.db.drop_table(self.table_name)
                self._cache.clear()
                table = None
            tagged = self.versions().get(model_version)
            if table is not None and tagged is not None and not self._rows_of(table, model_version):
                # a model built before (e.g. production again after a rollback): its tagged version
                # becomes the newest one again, instead of embedding the gallery anew
                table.restore(tagged)
            done = self._rows_of(table, model_version)
            todo = [im for im in images if im.image_id not in done]
            say(f"gallery index {self.table_name}: {len(todo)} of {len(images)} images to embed "
                f"with model {model_version}")
            bar = Progress(len(todo), f"embedding {self.table_name}", say=say, every_s=10)
            skipped: list[str] = []
            for i in range(0, len(todo), batch_size):
                batch = todo[i: i + batch_size]
                vectors, batch, bad = self._embed_batch(embed, batch, on_bad_image)
                skipped += bad
                if batch:
                    md5s, prints = zip(*(_file_identity(im.path) for im in batch))
                    rows = pa.table({
                        "image_id": [im.image_id for im in batch], "dataset": [self.dataset] * len(batch),
                        "split": [im.split for im in batch], "path": [str(im.path) for im in batch],
                        "md5": pa.array(md5s, pa.string()), "fingerprint": pa.array(prints, pa.binary()),
                        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
                        "model_version": [model_version] * len(batch)})
                    if table is None:
                        table = self.db.create_table(self.table_name, data=rows)
                    else:
                        table.add(rows)
                bar.update(min(i + batch_size, len(todo)))
            if table is None:
                raise GalleryIndexError(f"{self.dataset}: no image could be embedded")
            table.delete(f"model_version != '{_quote(model_version)}'")
            rows = table.count_rows()
            dim = _dimension(table)
            index_type, params = "exact", {"exact_below": self.exact_below}
            if rows >= self.exact_below:
                params = self.ann.create(table, rows, dim)
                index_type = params["index_type"]
            tag = self.tag(model_version)
            if tag in table.tags.list():
                table.tags.update(tag, table.version)
            else:
                table.tags.create(tag, table.version)
            seconds = time.monotonic() - start
            return IndexInfo(self.dataset, self.table_name, model_version, tag, table.version, rows, dim,
                             len(todo) - len(skipped), skipped, index_type, params, round(seconds, 2),
                             round((len(todo) - len(skipped)) / seconds, 1) if seconds else 0.0)

    @staticmethod
    def _embed_batch(embed, batch: list[GalleryImage], on_bad_image: str):
        try:
            return np.asarray(embed([im.path for im in batch]), dtype=np.float32), batch, []
        except Exception:  # noqa: BLE001 - find which image, and say so
            bad = [im for im in batch if not _readable(im.path)]
            if not bad:
                raise
            if on_bad_image == "fail":
                im = bad[0]
                raise GalleryIndexError(f"gallery image {im.image_id!r} ({im.path}) is missing or not a readable "
                                        f"image ({len(bad)} in this batch); fix it, or build with "
                                        f"on_bad_image='skip' to leave such images out") from None
            for im in bad:
                log.warning("gallery index: skipping unreadable image %s (%s)", im.image_id, im.path)
            good = [im for im in batch if im not in bad]
            vectors = np.asarray(embed([im.path for im in good]), dtype=np.float32) if good else None
            return vectors, good, [im.image_id for im in bad]

    # ---- searching ---------------------------------------------------------------------------

    def _version_table(self, model_version: str):
        table = self._open()
        built = self.versions()
        if table is None or model_version not in built:
            raise GalleryIndexError(
                f"no gallery index of {self.dataset} for model {model_version}"
                + (f" (built for: {', '.join(sorted(built))})" if built else " (none built yet)")
                + ": build it (the gallery_index asset) first")
        try:
            table.checkout(built[model_version])
        except Exception as e:  # noqa: BLE001 - lance raises many kinds: one clear error instead
            raise self._damaged(e) from None
        return table

    def paths(self, model_version: str) -> dict[str, Path]:
        """Image id -> image path of the index built for ``model_version`` (what a service shows)."""
        data = self._read(self._version_table(model_version), ["image_id", "path"])
        return dict(zip(data.column("image_id").to_pylist(), map(Path, data.column("path").to_pylist())))

    def hashes(self, model_version: str) -> dict[str, list[str]]:
        """Content hash -> the image ids with that content, in the index built for ``model_version``
        (computed from the image files for a table built before the ``md5`` column; an unreadable
        file has none)."""
        table = self._version_table(model_version)
        if "md5" in table.schema.names:
            data = self._read(table, ["image_id", "md5"])
            pairs = zip(data.column("image_id").to_pylist(), data.column("md5").to_pylist())
        else:
            log.warning("%s was built before content hashes: hashing its images now (the next build stores them)",
                        self.table_name)
            pairs = ((i, _file_hash(p)) for i, p in self.paths(model_version).items())
        out: dict[str, list[str]] = {}
        for image_id, digest in pairs:
            if digest is not None:
                out.setdefault(digest, []).append(image_id)
        return out

    def same_picture(self, model_version: str, paths: dict[str, Path] | None = None) -> SamePicture:
        """The gallery of the index built for ``model_version`` as :class:`SamePicture` finds an upload
        in it (fingerprints computed from the image files for a table built before they were stored)."""
        table = self._version_table(model_version)
        paths = paths if paths is not None else self.paths(model_version)   # the caller's, when it has read them
        if "fingerprint" in table.schema.names:
            data = self._read(table, ["image_id", "fingerprint"])
            ids, prints = data.column("image_id").to_pylist(), data.column("fingerprint").to_pylist()
        else:
            log.warning("%s was built before fingerprints: computing them from its images now (the next build "
                        "stores them)", self.table_name)
            ids = list(paths)
            prints = [_file_fingerprint(paths[i]) for i in ids]
        return SamePicture(ids, prints, paths)

    def vectors(self, model_version: str) -> tuple[list[str], np.ndarray]:
        """The ids and vectors [n, d] of the index built for ``model_version`` (what exact search reads)."""
        return self._vectors(self._version_table(model_version))

    def splits(self, model_version: str) -> dict[str, str]:
        """Image id -> split of every row of the index built for ``model_version``."""
        data = self._read(self._version_table(model_version), ["image_id", "split"])
        return dict(zip(data.column("image_id").to_pylist(), data.column("split").to_pylist()))

    def has_ann(self, model_version: str) -> bool:
        """Whether the version built for ``model_version`` has an ANN index (built at or above
        ``exact_below`` rows, by whichever threshold the build had)."""
        return bool(self._indices(self._version_table(model_version)))

    def _indices(self, table) -> list:
        try:
            return list(table.list_indices())
        except Exception as e:  # noqa: BLE001 - lance raises many kinds: one clear error instead
            raise self._damaged(e) from None

    def agreement(self, model_version: str, ids: Sequence[str], vectors, *,
                  min_cosine: float) -> VectorAgreement:
        """The stored vectors of ``ids`` in the version built for ``model_version`` against
        ``vectors`` [n, d] (the model's embeddings of the same images, made now): their cosine per
        image, and the images whose stored vector is missing or below ``min_cosine``."""
        stored_ids, stored = self.vectors(model_version)
        row = {i: j for j, i in enumerate(stored_ids)}
        fresh = np.asarray(vectors, dtype=np.float32)
        if fresh.ndim != 2 or fresh.shape[0] != len(ids):
            raise GalleryIndexError(f"{len(ids)} ids but vectors of shape {list(fresh.shape)}")
        if fresh.shape[1] != stored.shape[1]:   # another model's space: no image agrees
            return VectorAgreement(len(ids), [i for i in ids if i not in row],
                                   [i for i in ids if i in row], float("nan"), float("nan"),
                                   f"dimension {fresh.shape[1]}, the index has {stored.shape[1]}")
        missing = [i for i in ids if i not in row]
        kept = [(i, v) for i, v in zip(ids, fresh) if i in row]
        if not kept:
            return VectorAgreement(len(ids), missing, [], float("nan"), float("nan"), "")
        mine = stored[[row[i] for i, _ in kept]]
        theirs = np.stack([v for _, v in kept])
        cosine = np.sum(mine * theirs, axis=1) / (np.linalg.norm(mine, axis=1) * np.linalg.norm(theirs, axis=1))
        cosine = np.nan_to_num(cosine, nan=-1.0)
        differ = [i for (i, _), c in zip(kept, cosine) if c < min_cosine]
        return VectorAgreement(len(ids), missing, differ, float(cosine.min()),
                               float(np.abs(mine - theirs).max()), "")

    def _read(self, table, columns: list[str]):
        try:
            return table.to_arrow().select(columns)
        except Exception as e:  # noqa: BLE001 - lance raises many kinds: one clear error instead
            raise self._damaged(e) from None

    def _vectors(self, table) -> tuple[list[str], np.ndarray]:
        key = table.version
        if key not in self._cache:
            data = self._read(table, ["image_id", "vector"])
            vectors = np.asarray(data.column("vector").combine_chunks().flatten(), dtype=np.float32)
            self._cache = {key: (data.column("image_id").to_pylist(), vectors.reshape(data.num_rows, -1))}
        return self._cache[key]

    def search(self, query_vectors, k: int, *, model_version: str,
               exclude: Sequence[Iterable[str]] | None = None,
               ann: bool | None = None) -> tuple[list[list[str]], list[list[float]]]:
        """The ``k`` nearest gallery ids and their cosine scores per query, in the index built for
        ``model_version``; ``exclude[i]`` ids never come back for query i (a prefilter). ``ann``:
        None searches as the size says (the ANN index at or above ``exact_below`` rows, where there
        is one), True the ANN index (a GalleryIndexError without one), False exactly."""
        table = self._version_table(model_version)
        if ann and not self._indices(table):
            raise GalleryIndexError(f"the gallery index {self.table_name} for model {model_version} has no ANN index "
                                    f"(searched exactly: it was built below exact_below rows)")
        q = np.asarray(query_vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        dim, rows = _dimension(table), table.count_rows()
        if q.ndim != 2 or q.shape[1] != dim:
            raise GalleryIndexError(f"query vectors must be [n, {dim}] for this index, not {list(q.shape)}")
        norms = np.linalg.norm(q, axis=1)
        if not np.all(np.abs(norms - 1) < NORM_TOLERANCE):
            raise GalleryIndexError(f"query vectors must be L2-normalised (norms {norms.min():.4f} to "
                                    f"{norms.max():.4f})")
        if exclude is not None and len(exclude) != len(q):
            raise GalleryIndexError(f"{len(exclude)} exclusion sets for {len(q)} queries")
        largest = rows - max((len(set(e)) for e in exclude), default=0) if exclude is not None else rows
        if not isinstance(k, int) or k < 1 or k > largest:
            raise GalleryIndexError(f"k must be a whole number from 1 to {largest} (the gallery has {rows} images), "
                                    f"not {k!r}")
        use_ann = ann if ann is not None else rows >= self.exact_below
        if not use_ann or not self._indices(table):
            ids, vectors = self._vectors(table)
            return exact_topk(q, vectors, ids, k, exclude=exclude)
        out_ids, out_scores = [], []
        for i, vector in enumerate(q):
            query = (table.search(vector, vector_column_name="vector").distance_type("cosine")
                     .nprobes(self.ann.nprobes).refine_factor(self.ann.refine_factor)
                     .select(["image_id", "_distance"]).limit(k))
            banned = sorted(set(exclude[i])) if exclude is not None else []
            if banned:
                query = query.where("image_id NOT IN (" + ", ".join(f"'{_quote(b)}'" for b in banned) + ")",
                                    prefilter=True)
            found = query.to_arrow()
            out_ids.append(found.column("image_id").to_pylist())
            out_scores.append([1.0 - d for d in found.column("_distance").to_pylist()])
        return out_ids, out_scores

    def recall_against_exact(self, query_vectors, k: int, model_version: str, *,
                             exclude: Sequence[Iterable[str]] | None = None) -> float | None:
        """Recall@k of the ANN index of the version built for ``model_version`` against exact
        search over the same vectors: the share of the exact top ``k`` that the ANN search returns
        (what the index loses). Measured whenever the version has an ANN index, whatever
        ``exact_below`` says now; None when it has none (it is searched exactly: nothing to lose)."""
        if not self.has_ann(model_version):
            return None
        found, _ = self.search(query_vectors, k, model_version=model_version, exclude=exclude, ann=True)
        ids, vectors = self.vectors(model_version)
        exact, _ = exact_topk(np.asarray(query_vectors, dtype=np.float32), vectors, ids, k, exclude=exclude)
        return sum(len(set(a) & set(b)) for a, b in zip(found, exact)) / (k * len(exact))


def _quote(text: str) -> str:
    return str(text).replace("'", "''")


def _dimension(table) -> int:
    return table.schema.field("vector").type.list_size


def _readable(path: Path) -> bool:

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - any reason an image cannot be opened
        return False
