"""The gallery index (model_code/index.py): LanceDB tables versioned by model, exact and ANN search."""

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from model_code.common import bytes_md5
from model_code.index import AnnConfig, GalleryImage, GalleryIndex, GalleryIndexError, exact_topk

DIM = 16


def _unit(rng, n, d=DIM, centres=None):
    if centres is not None:  # clustered like real embeddings: a mixture around a few centres
        x = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.normal(size=(n, d))
    else:
        x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def gallery(tmp_path):
    """200 small PNGs and a vector per image (what a model would embed), and an embedder that, like
    the model, fails on an image it cannot read."""
    from PIL import Image

    rng = np.random.default_rng(0)
    vectors = _unit(rng, 200)
    folder = tmp_path / "images"
    folder.mkdir()
    images = []
    for j in range(200):
        path = folder / f"i{j:03d}.png"
        Image.new("RGB", (8, 8), (j % 256, 0, 0)).save(path)
        images.append(GalleryImage(f"i{j:03d}", "test", path))
    lookup = {im.image_id: v for im, v in zip(images, vectors)}

    class Embedder:
        def __init__(self):
            self.calls = 0

        def __call__(self, paths, sign=1.0):
            self.calls += len(paths)
            for p in paths:
                with Image.open(p) as im:
                    im.load()
            return np.stack([sign * lookup[Path(p).stem] for p in paths])

    return images, vectors, Embedder()


def test_search_equals_the_evaluations_exact_ranking(micro_base, tiny_synthetic, tmp_path):
    import torch

    from model_code.backbone import load_backbone
    from model_code.data import read_dataset
    from model_code.evaluation.metrics import rank_gallery, reference_exclusions
    from model_code.model.cir_cot import CirCoTModel, apply_lora

    torch.manual_seed(0)
    model, processor = load_backbone(micro_base, device="cpu")
    m = CirCoTModel(apply_lora(model, processor, r=2, alpha=4), processor, base_path=str(micro_base))
    bench = read_dataset("synthetic", tiny_synthetic)
    test = bench.images[bench.images.split == "test"]
    images = [GalleryImage(i, "test", tiny_synthetic / p) for i, p in zip(test.image_id, test.path)]
    index = GalleryIndex(tmp_path / "db", "synthetic")
    info = index.build(lambda paths: m.embed_images(paths), images, model_version="v1", batch_size=8)
    assert (info.rows, info.dimension, info.index_type, info.tag) == (len(images), 64, "exact", "model-v1")
    q = bench.triplets[bench.triplets.split == "test"]
    paths = dict(zip(test.image_id, test.path))
    emb = m.embed_queries([tiny_synthetic / paths[r] for r in q.reference_id], list(q.modification))
    exclude = reference_exclusions("synthetic", list(q.reference_id))
    found, scores = index.search(emb.numpy(), 5, model_version="v1", exclude=exclude)
    expected = rank_gallery(emb, m.embed_images([im.path for im in images]), [im.image_id for im in images],
                            exclude=exclude, top=5)
    assert found == expected
    assert all(r not in ids for r, ids in zip(q.reference_id, found))  # the reference is excluded
    assert all(s == sorted(s, reverse=True) for s in scores)


@pytest.fixture(scope="module")
def micro_gallery(micro_base, tiny_synthetic):
    """A micro model, the tiny benchmark, its test split's gallery images, and another model: the
    micro model with every weight moved a little (what a gallery embedded by another model holds)."""
    import torch

    from model_code.backbone import load_backbone
    from model_code.data import read_dataset
    from model_code.model.cir_cot import CirCoTModel, apply_lora

    def model(shift: float = 0.0):
        torch.manual_seed(0)
        backbone, processor = load_backbone(micro_base, device="cpu")
        m = CirCoTModel(apply_lora(backbone, processor, r=2, alpha=4), processor, base_path=str(micro_base))
        with torch.no_grad():
            for param in m.model.parameters():
                param.add_(shift * torch.randn_like(param))
        return m

    bench = read_dataset("synthetic", tiny_synthetic)
    test = bench.images[bench.images.split == "test"]
    images = [GalleryImage(i, "test", tiny_synthetic / p) for i, p in zip(test.image_id, test.path)]
    return model(), model(0.05), bench, images


def _verify(index, micro_gallery, tiny_synthetic, **kwargs):
    from assets.gallery_index import verify_index

    m, _, bench, _ = micro_gallery
    return verify_index(index, "v1", m, bench, str(tiny_synthetic), "synthetic", **{"images": 8, **kwargs})


def test_the_index_check_passes_on_the_models_gallery_and_fails_on_another_models(micro_gallery, tiny_synthetic,
                                                                                 tmp_path):
    """index_recall below 50,000 images: the index is searched exactly, so what can be wrong is the
    stored vectors; the check re-embeds a sample with the model and compares them."""
    m, other, _, images = micro_gallery
    index = GalleryIndex(tmp_path / "db", "synthetic")
    index.build(lambda paths: m.embed_images(paths), images, model_version="v1", batch_size=8)
    ok = _verify(index, micro_gallery, tiny_synthetic, rows=len(images))
    assert ok.passed, ok.description
    assert ok.metadata["vectors_compared"] == 8 and ok.metadata["min_cosine"] > 0.9999
    assert ok.metadata["images_of_split"] == ok.metadata["rows"] == len(images)
    assert "ann_recall_at_10" not in ok.metadata and "no ANN index" in ok.description

    wrong = GalleryIndex(tmp_path / "other", "synthetic")   # the same images, embedded by another model
    wrong.build(lambda paths: other.embed_images(paths), images, model_version="v1", batch_size=8)
    bad = _verify(wrong, micro_gallery, tiny_synthetic, rows=len(images))
    assert not bad.passed and bad.metadata["vectors_differing"] == 8, bad.description
    assert "8 of 8 stored vectors differ from the model's embedding" in bad.description


def test_the_index_check_fails_on_a_changed_vector_a_missing_image_and_a_wrong_count(micro_gallery, tiny_synthetic,
                                                                                   tmp_path):
    m, _, _, images = micro_gallery
    index = GalleryIndex(tmp_path / "db", "synthetic")
    index.build(lambda paths: m.embed_images(paths), images, model_version="v1", batch_size=8)
    # one stored vector changed after the build (the tagged version moved to the changed table)
    ids, vectors = index.vectors("v1")
    table = index.db.open_table(index.table_name)
    table.update(where=f"image_id = '{ids[0]}'", values={"vector": (-vectors[0]).tolist()})
    table.tags.update(index.tag("v1"), table.version)
    changed = _verify(GalleryIndex(tmp_path / "db", "synthetic"), micro_gallery, tiny_synthetic, images=len(images))
    assert not changed.passed and changed.metadata["vectors_differing"] == 1, changed.description
    assert f"1 of {len(images)} stored vectors differ" in changed.description and ids[0] in changed.description
    # an image of the evaluated gallery the build left out (and did not say it skipped)
    partial = GalleryIndex(tmp_path / "partial", "synthetic")
    partial.build(lambda paths: m.embed_images(paths), images[1:], model_version="v1", batch_size=8)
    gone = _verify(partial, micro_gallery, tiny_synthetic, rows=len(images) - 1)
    assert not gone.passed and gone.metadata["missing"] == 1
    assert f"1 of the {len(images)} images of test" in gone.description and images[0].image_id in gone.description
    said_skipped = _verify(partial, micro_gallery, tiny_synthetic, rows=len(images) - 1, skipped=[images[0].image_id])
    assert said_skipped.passed, said_skipped.description
    wrong_count = _verify(partial, micro_gallery, tiny_synthetic, rows=len(images), skipped=[images[0].image_id])
    assert not wrong_count.passed and f"its build recorded {len(images)}" in wrong_count.description


def test_the_index_check_measures_an_ann_index(micro_gallery, tiny_synthetic, tmp_path):
    m, _, _, images = micro_gallery
    verdicts = {}
    for name, ann in (("fine", AnnConfig(num_partitions=2, nprobes=2, refine_factor=30)),
                      ("coarse", AnnConfig(num_partitions=4, nprobes=1, refine_factor=1))):
        index = GalleryIndex(tmp_path / name, "synthetic", exact_below=10, ann=ann)
        assert index.build(lambda paths: m.embed_images(paths), images, model_version="v1").index_type == "IVF_RQ"
        verdicts[name] = _verify(index, micro_gallery, tiny_synthetic, rows=len(images))
    fine, coarse = verdicts["fine"], verdicts["coarse"]
    assert fine.passed and fine.metadata["ann_recall_at_10"] >= 0.95, fine.description
    assert fine.metadata["queries"] == 12 and "recall@10 of the ANN index against exact search" in fine.description
    assert not coarse.passed and coarse.metadata["ann_recall_at_10"] < 0.95, coarse.description
    assert coarse.metadata["vectors_differing"] == 0       # the vectors are right: the ANN search loses neighbours


def test_exclusion_is_a_prefilter_and_k_results_come_back(gallery, tmp_path):
    images, vectors, embed = gallery
    index = GalleryIndex(tmp_path / "db", "cirr")
    index.build(embed, images, model_version="v1")
    ids, _ = index.search(vectors[:1], 3, model_version="v1")
    assert ids[0][0] == "i000"
    banned = set(ids[0][:2])
    ids2, _ = index.search(vectors[:1], 3, model_version="v1", exclude=[banned])
    assert len(ids2[0]) == 3 and not banned & set(ids2[0]) and ids2[0][0] == ids[0][2]
    everything_else, _ = index.search(vectors[:1], 198, model_version="v1", exclude=[banned])
    assert len(everything_else[0]) == 198


def test_an_interrupted_build_resumes_and_a_grown_catalogue_embeds_only_new_images(gallery, tmp_path):
    images, vectors, embed = gallery
    index = GalleryIndex(tmp_path / "db", "synthetic")
    seen = []

    def crashing(paths):
        seen.append(len(paths))
        if len(seen) == 3:
            raise KeyboardInterrupt("simulated crash")
        return embed(paths)

    with pytest.raises(KeyboardInterrupt):
        index.build(crashing, images[:150], model_version="v1", batch_size=20)
    with FileLock(Path(index.uri) / ".gallery_synthetic.build.lock", timeout=0):
        pass  # the lock is released
    embed.calls = 0
    info = index.build(embed, images[:150], model_version="v1", batch_size=20)
    assert embed.calls == 150 - 40 and info.embedded == 110 and info.rows == 150  # two batches were kept
    embed.calls = 0
    info = index.build(embed, images, model_version="v1", batch_size=20)  # the catalogue grows by 50
    assert embed.calls == 50 and info.rows == 200 and info.embedded == 50
    again = index.build(embed, images, model_version="v1")
    assert again.embedded == 0 and again.rows == 200


def test_versions_follow_the_model_and_rollback_is_a_checkout(gallery, tmp_path):
    images, vectors, embed = gallery
    index = GalleryIndex(tmp_path / "db", "synthetic")
    index.build(embed, images, model_version="A")
    index.build(lambda paths: embed(paths, sign=-1.0), images, model_version="B")  # another model's space
    assert set(index.versions()) == {"A", "B"}
    a, _ = index.search(vectors[:2], 1, model_version="A")
    b, _ = index.search(vectors[:2], 1, model_version="B")
    assert a == [["i000"], ["i001"]] and b != a  # B's rows answer B's queries; A's version is still there
    embed.calls = 0
    assert index.search(vectors[:2], 1, model_version="A")[0] == a and embed.calls == 0  # nothing re-embedded
    # building for A again (A is production again after a rollback) restores A's version: no embedding
    info = index.build(embed, images, model_version="A")
    assert embed.calls == 0 and info.embedded == 0 and info.rows == 200
    assert index.search(vectors[:2], 1, model_version="A")[0] == a


@pytest.mark.parametrize("kind", ["IVF_RQ", "IVF_PQ"])
def test_ann_index_above_the_threshold_with_recall_against_exact(tmp_path, kind):
    rng = np.random.default_rng(1)
    centres = _unit(rng, 12)
    vectors = _unit(rng, 3000, centres=centres)
    images = [GalleryImage(f"g{j}", "test", Path(f"/nowhere/g{j}.png")) for j in range(len(vectors))]
    lookup = {im.image_id: v for im, v in zip(images, vectors)}
    index = GalleryIndex(tmp_path / "db", "circo", exact_below=1000,
                         ann=AnnConfig(index_type=kind, num_partitions=16, num_sub_vectors=4, nprobes=8,
                                       refine_factor=10))
    info = index.build(lambda paths: np.stack([lookup[Path(p).stem] for p in paths]), images, model_version="v1",
                       batch_size=500)
    assert info.index_type == kind and info.index_params["num_partitions"] == 16
    queries = _unit(rng, 40, centres=centres)
    exclude = [{f"g{j}"} for j in range(40)]
    found, scores = index.search(queries, 10, model_version="v1", exclude=exclude)
    exact, _ = exact_topk(queries, vectors, [im.image_id for im in images], 10, exclude=exclude)
    recall = sum(len(set(f) & set(e)) for f, e in zip(found, exact)) / 400
    assert recall >= 0.9, recall
    assert all(len(f) == 10 and f"g{j}" not in f for j, f in enumerate(found))


def _ann_index(tmp_path, vectors, name, **ann):
    images = [GalleryImage(f"g{j}", "test", Path(f"/nowhere/g{j}.png")) for j in range(len(vectors))]
    lookup = {im.image_id: v for im, v in zip(images, vectors)}
    index = GalleryIndex(tmp_path / name, "circo", exact_below=1000,
                         ann=AnnConfig(index_type="IVF_RQ", num_partitions=16, **ann))
    index.build(lambda paths: np.stack([lookup[Path(p).stem] for p in paths]), images, model_version="v1",
                batch_size=500)
    return index


def test_recall_against_exact_measures_the_ann_path_whenever_there_is_one(tmp_path):
    """What index_recall checks of an ANN index: the ANN search's recall@10 against exact search,
    measured by hand here, low for an index searched too coarsely, and measured even where the
    index is opened with a threshold above its size (the service's default); None without one."""
    rng = np.random.default_rng(1)
    centres = _unit(rng, 12)
    vectors = _unit(rng, 3000, centres=centres)
    queries = _unit(rng, 40, centres=centres)
    exclude = [{f"g{j}"} for j in range(40)]
    ids = [f"g{j}" for j in range(len(vectors))]
    scores = queries @ vectors.T
    scores[np.arange(40), np.arange(40)] = -np.inf            # each query's own exclusion, by hand
    truth = [[ids[j] for j in np.argsort(-row, kind="stable")[:10]] for row in scores]

    def by_hand(index):
        found, _ = index.search(queries, 10, model_version="v1", exclude=exclude, ann=True)
        return sum(len(set(f) & set(t)) for f, t in zip(found, truth)) / 400

    fine = _ann_index(tmp_path, vectors, "fine", nprobes=16, refine_factor=30)     # every partition, refined
    coarse = _ann_index(tmp_path, vectors, "coarse", nprobes=1, refine_factor=1)
    good, bad = (i.recall_against_exact(queries, 10, "v1", exclude=exclude) for i in (fine, coarse))
    assert good == pytest.approx(by_hand(fine)) and good >= 0.95, good
    assert bad == pytest.approx(by_hand(coarse)) and bad < 0.9, bad    # what an index that loses neighbours gets
    reopened = GalleryIndex(fine.uri, "circo", exact_below=50_000, ann=fine.ann)  # measured whatever the threshold
    assert reopened.has_ann("v1") and reopened.recall_against_exact(queries, 10, "v1", exclude=exclude) == good
    small = GalleryIndex(tmp_path / "exact", "circo")
    lookup = dict(zip(ids, vectors))
    small.build(lambda paths: np.stack([lookup[Path(p).stem] for p in paths]),
                [GalleryImage(i, "test", Path(f"/nowhere/{i}.png")) for i in ids[:500]], model_version="v1")
    assert not small.has_ann("v1") and small.recall_against_exact(queries, 10, "v1") is None
    with pytest.raises(GalleryIndexError, match="has no ANN index"):
        small.search(queries, 10, model_version="v1", ann=True)


def test_bad_queries_and_missing_indexes_are_refused(gallery, tmp_path):
    images, vectors, embed = gallery
    index = GalleryIndex(tmp_path / "db", "synthetic")
    with pytest.raises(GalleryIndexError, match="no gallery index of synthetic for model v1 \\(none built yet\\)"):
        index.search(vectors[:1], 5, model_version="v1")
    index.build(embed, images, model_version="v1")
    cases = [
        (dict(query_vectors=np.ones((1, 5), np.float32) / 5 ** 0.5, k=5), r"must be \[n, 16\]"),
        (dict(query_vectors=vectors[:1] * 2, k=5), "must be L2-normalised"),
        (dict(query_vectors=vectors[:1], k=0), "k must be a whole number from 1 to 200"),
        (dict(query_vectors=vectors[:1], k=201), "k must be a whole number from 1 to 200"),
        (dict(query_vectors=vectors[:1], k=200, exclude=[{"i000"}]), "from 1 to 199"),
    ]
    for kwargs, message in cases:
        with pytest.raises(GalleryIndexError, match=message):
            index.search(model_version="v1", **kwargs)
    with pytest.raises(GalleryIndexError, match=r"for model v2 \(built for: v1\)"):
        index.search(vectors[:1], 5, model_version="v2")
    with pytest.raises(GalleryIndexError, match="no gallery index of fashioniq"):
        GalleryIndex(tmp_path / "db", "fashioniq").search(vectors[:1], 5, model_version="v1")


def test_bad_images_fail_with_their_id_or_are_skipped_by_choice(gallery, tmp_path):
    images, vectors, embed = gallery
    images[5].path.write_bytes(b"not a png")
    images[7].path.unlink()
    index = GalleryIndex(tmp_path / "db", "synthetic")
    with pytest.raises(GalleryIndexError, match="gallery image 'i005' .* is missing or not a readable image"):
        index.build(embed, images, model_version="v1", batch_size=50)
    assert index.versions() == {}  # nothing tagged: search does not see a half-built index
    info = index.build(embed, images, model_version="v1", batch_size=50, on_bad_image="skip")
    assert info.skipped == ["i005", "i007"] and info.rows == 198


def _hold_lock(path: Path, seconds: float = 60.0) -> subprocess.Popen:
    """Another process that takes the build lock ``path``, says so, and keeps it ``seconds``."""
    code = ("import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(float(sys.argv[2]))")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_two_builds_of_one_table_at_once_are_refused_and_a_killed_builds_lock_blocks_nothing(gallery, tmp_path):
    images, vectors, embed = gallery
    index = GalleryIndex(tmp_path / "db", "synthetic")
    lock = Path(index.uri) / ".gallery_synthetic.build.lock"
    holder = _hold_lock(lock)  # another process's build of the same table
    try:
        with pytest.raises(GalleryIndexError, match=f"another build of gallery_synthetic is running: it holds the "
                                                    f"lock {re.escape(str(lock))}; wait for it to finish"):
            index.build(embed, images, model_version="v1")
        assert embed.calls == 0 and index.versions() == {}  # refused before anything was embedded
    finally:
        holder.kill()  # the build dies without releasing its lock: the OS drops it with the process
        holder.wait()
    assert lock.exists()  # its file stays behind, and does not block the next build
    assert index.build(embed, images, model_version="v1").rows == 200
    lock.write_text("999999999")  # a lock file left by the pid-file lock of an older version blocks nothing either
    assert index.build(embed, images, model_version="v1").rows == 200


def test_a_build_in_the_same_process_is_refused_too_and_one_with_a_timeout_waits_for_the_other(gallery, tmp_path):
    images, vectors, embed = gallery
    lock = tmp_path / "db" / ".gallery_synthetic.build.lock"
    index = GalleryIndex(tmp_path / "db", "synthetic")
    with FileLock(lock):  # e.g. another thread's build
        with pytest.raises(GalleryIndexError, match="another build of gallery_synthetic is running"):
            index.build(embed, images, model_version="v1")
    patient = GalleryIndex(tmp_path / "db", "synthetic", lock_timeout_s=0.3)
    holder = _hold_lock(lock, seconds=30)
    try:
        start = time.monotonic()
        with pytest.raises(GalleryIndexError, match=r"holds the lock .* \(waited 0.3 s\)"):
            patient.build(embed, images, model_version="v1")
        assert time.monotonic() - start >= 0.3  # it waited its timeout before giving up
    finally:
        holder.kill()
        holder.wait()
    holder = _hold_lock(lock, seconds=1.0)  # a build that ends within the wait
    start = time.monotonic()
    assert GalleryIndex(tmp_path / "db", "synthetic", lock_timeout_s=30).build(
        embed, images, model_version="v1").rows == 200
    assert time.monotonic() - start >= 0.5 and holder.wait() == 0  # it waited for the other, then built


def test_the_pipeline_and_the_service_find_the_index_at_one_uri(tmp_path):
    from model_code.index import index_uri

    # an object store LanceDB opens itself: the URI keeps its scheme and both slashes
    assert index_uri("s3://bucket/circot") == "s3://bucket/circot/lancedb"
    assert index_uri("gs://bucket/circot/", local_copy=tmp_path) == "gs://bucket/circot/lancedb"
    # a local root, and the pipeline's local copy of a store LanceDB cannot open
    assert index_uri("artifacts") == str(Path("artifacts") / "lancedb")
    assert index_uri("memory://x", local_copy=tmp_path) == str(tmp_path / "lancedb")
    with pytest.raises(GalleryIndexError, match="CIRCOT_INDEX_URI"):
        index_uri("memory://x")
    # an explicit index URI wins everywhere
    assert index_uri("s3://bucket/circot", "s3://other/index") == "s3://other/index"


def _damage_data(db):
    f = sorted((db / "gallery_synthetic.lance" / "data").glob("*.lance"))[-1]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def _damage_manifest(db):
    for f in (db / "gallery_synthetic.lance" / "_versions").glob("*.manifest"):
        f.write_bytes(b"\0garbage")


def _damage_tag(db):
    for f in (db / "gallery_synthetic.lance" / "_refs" / "tags").glob("*.json"):
        f.write_text("{not json")


@pytest.mark.parametrize("damage", [_damage_data, _damage_manifest, _damage_tag])
def test_a_damaged_index_is_named_as_such_and_the_next_build_rebuilds_it(gallery, tmp_path, damage):
    """The index is derived data: a damaged table is a clear error where it is read, and the next
    build (the gallery_index asset) replaces it without anyone deleting folders."""
    images, vectors, embed = gallery
    db = tmp_path / "db"
    GalleryIndex(db, "synthetic").build(embed, images, model_version="v1")
    damage(db)
    index = GalleryIndex(db, "synthetic")
    with pytest.raises(GalleryIndexError, match="gallery_synthetic at .* is damaged .*rebuilds it"):
        index.check()
    with pytest.raises(GalleryIndexError, match="is damaged"):
        index.search(vectors[:2], 5, model_version="v1")
    said = []
    info = GalleryIndex(db, "synthetic").build(embed, images, model_version="v1", progress=said.append)
    assert info.rows == len(images) and info.embedded == len(images)
    assert any("is damaged" in line and "removing it to rebuild" in line for line in said)
    rebuilt = GalleryIndex(db, "synthetic")
    rebuilt.check()
    found, _ = rebuilt.search(vectors[:2], 1, model_version="v1")
    assert [f[0] for f in found] == [images[0].image_id, images[1].image_id]


def test_each_image_is_found_by_its_content_and_an_index_made_before_hashes_still_serves(gallery, tmp_path):
    """The md5 of each image's bytes is stored (how the service finds an uploaded reference in the
    gallery); a table built before that column is read with hashes computed from its files, and the
    next build rebuilds it with the column."""
    import pyarrow as pa


    images, vectors, embed = gallery
    expected = {bytes_md5(im.path.read_bytes()): [im.image_id] for im in images}
    index = GalleryIndex(tmp_path / "db", "synthetic")
    index.build(embed, images, model_version="v1")
    assert index.hashes("v1") == expected
    assert bytes_md5(images[7].path.read_bytes()) != bytes_md5(images[8].path.read_bytes())
    # a table as the index was written before content hashes: no md5 column, tagged for its model
    old = GalleryIndex(tmp_path / "old", "synthetic")
    rows = pa.table({"image_id": [im.image_id for im in images], "dataset": ["synthetic"] * len(images),
                     "split": ["test"] * len(images), "path": [str(im.path) for im in images],
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
                     "model_version": ["v1"] * len(images)})
    table = old.db.create_table(old.table_name, data=rows)
    table.tags.create(old.tag("v1"), table.version)
    assert old.hashes("v1") == expected
    ids, _ = old.search(vectors[:1], 3, model_version="v1")
    assert ids[0][0] == "i000"      # still searched as before
    said: list[str] = []
    info = old.build(embed, images, model_version="v1", progress=said.append)
    assert any("before content hashes and fingerprints: rebuilding" in s for s in said)
    assert info.embedded == len(images)
    assert "md5" in old._open().schema.names and old.hashes("v1") == expected


def test_the_same_picture_is_found_whatever_its_file_and_a_distinct_one_never(tiny_synthetic, tmp_path):
    """How the service finds an uploaded reference in the gallery when its bytes differ: saved again
    (PNG, JPEG), resized a little or by half or double, it is found; no other image of the gallery is."""
    from PIL import Image

    from bench.same_picture import variants

    files = sorted((tiny_synthetic / "images" / "test").glob("*.png"))
    images = [GalleryImage(f.stem, "test", f) for f in files]
    rng = np.random.default_rng(0)
    lookup = {f.stem: v for f, v in zip(files, _unit(rng, len(files)))}
    index = GalleryIndex(tmp_path / "db", "synthetic")
    index.build(lambda paths: np.stack([lookup[Path(p).stem] for p in paths]), images, model_version="v1")
    assert "fingerprint" in index._open().schema.names
    same = index.same_picture("v1")
    assert len(same) == len(files) > 10
    for f in files:
        with Image.open(f) as im:
            im.load()
        assert same.matches(im) == [f.stem]                       # itself, and no distinct image
        for name, v in variants(im).items():
            if name == "jpeg 75":   # at 64 px it blurs colours as far apart as yellow from orange
                continue
            assert same.matches(v) == [f.stem], (f.stem, name)
    # an index built before fingerprints were stored: computed from its files, the same answers
    table = index._open()
    table.drop_columns(["fingerprint"])
    old = GalleryIndex(tmp_path / "db", "synthetic")
    assert "fingerprint" not in old._open().schema.names
    with Image.open(files[2]) as im:
        assert old.same_picture("v1").matches(im.resize((im.width + 6, im.height + 6))) == [files[2].stem]
