"""Faults and bad inputs, one row each: (what is done, the error or outcome expected).

Each row is a small function that builds the bad input in a temporary folder and acts on it as a
user would; the expectation is either ``Error(type, "regex")`` (the sentence a user gets) or
``Outcome(check)`` (what must hold afterwards: nothing lost, nothing stale). The next fault found
is one more row. (Rejected tables not replacing passing ones is end to end in test_pipeline.py.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO


@dataclasses.dataclass
class Error:
    type: type
    match: str


@dataclasses.dataclass
class Outcome:
    check: Callable[[object], None]


@dataclasses.dataclass
class Ctx:
    tmp: Path
    tiny_synthetic: Path
    micro_base: Path


def _copy_synthetic(ctx: Ctx) -> Path:
    root = ctx.tmp / "cir-shapes"
    shutil.copytree(ctx.tiny_synthetic, root)
    return root


def _edit_json(path: Path, change: Callable) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ---- 1, 2: the annotation store -------------------------------------------------------------------------

WRITER = """
import sys
from model_code.annotation.store import AnnotationStore, annotate_missing, annotation_requests
from model_code.data import read_dataset
from model_code.synthetic.oracle import OracleAnnotator
root, store, part = sys.argv[1], sys.argv[2], int(sys.argv[3])
bench = read_dataset("synthetic", root)
requests = annotation_requests(bench.triplets, bench.images, root)
mine = requests[part::2] + requests[:10]   # disjoint halves, plus the same 10 for both
stats = annotate_missing(AnnotationStore(store), OracleAnnotator(root), mine, chunk_size=3, progress=lambda s: None)
print(stats.annotated)
"""


def two_writers_at_once(ctx: Ctx):
    from model_code.annotation.store import AnnotationStore
    from model_code.data import read_dataset

    store = ctx.tmp / "store"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(ctx.tiny_synthetic), str(store), str(k)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True) for k in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    n = len(read_dataset("synthetic", ctx.tiny_synthetic).triplets)
    return n, [int(o.split()[-1]) for o in outs], AnnotationStore(store).table()


def _all_rows_kept(result):
    n, counts, table = result
    assert len(table) == n  # every query's row is there: no writer overwrote another's part
    assert sum(counts) >= n  # the overlap may be annotated by both; nothing reported stored is missing


def corrupt_part(ctx: Ctx):
    from model_code.annotation.store import AnnotationStore, annotate_missing, annotation_requests
    from model_code.data import read_dataset
    from model_code.synthetic.oracle import OracleAnnotator

    bench = read_dataset("synthetic", ctx.tiny_synthetic)
    requests = annotation_requests(bench.triplets, bench.images, ctx.tiny_synthetic)
    store = AnnotationStore(ctx.tmp / "store")
    annotate_missing(store, OracleAnnotator(ctx.tiny_synthetic), requests, chunk_size=10, progress=lambda s: None)
    victim = store.parts()[1]
    victim.write_bytes(victim.read_bytes()[:40])          # truncated
    (store.root / "part-00000000000000000001-1-zero.parquet").write_bytes(b"")  # zero bytes
    again = AnnotationStore(store.root)
    stats = annotate_missing(again, OracleAnnotator(ctx.tiny_synthetic), requests, chunk_size=10,
                             progress=lambda s: None)
    return stats, again, len(requests)


def foreign_part_and_folder(ctx: Ctx):
    """A Parquet file of another table, and a folder, both named like parts: neither is read as rows
    (an all-null annotation) nor crashes compaction."""
    import pandas as pd

    from model_code.annotation.store import AnnotationStore, annotate_missing, annotation_requests
    from model_code.data import read_dataset
    from model_code.synthetic.oracle import OracleAnnotator

    bench = read_dataset("synthetic", ctx.tiny_synthetic)
    requests = annotation_requests(bench.triplets, bench.images, ctx.tiny_synthetic)
    store = AnnotationStore(ctx.tmp / "store")
    annotate_missing(store, OracleAnnotator(ctx.tiny_synthetic), requests, chunk_size=10, progress=lambda s: None)
    pd.DataFrame({"image_id": ["a"], "width": [3]}).to_parquet(store.root / "part-00000000000000000002-1-x.parquet")
    (store.root / "part-00000000000000000003-1-dir.parquet").mkdir()
    again = AnnotationStore(store.root)
    again.compact()
    return again, len(requests)


def _foreign_quarantined_rows_intact(result):
    store, n = result
    table = store.table()
    assert len(table) == n and table["status"].notna().all() and len(store.parts()) == 1
    assert sorted(q.name.split("-")[-1] for q in store.quarantined) == ["dir.parquet", "x.parquet"]


def _quarantined_and_reannotated(result):
    stats, store, n = result
    assert stats.annotated == 10  # the truncated part's rows, annotated again
    assert len(store.table()) == n and len(store.quarantined) == 2
    assert all(q.parent.name == "quarantine" and q.exists() for q in store.quarantined)


# ---- 3: the generator's output folder ---------------------------------------------------------------------


def _generate(out: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_code.synthetic", "--out", out, "--train-references", "2",
                           "--val-references", "1", "--test-references", "1"], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)


def out_through_dotdot(ctx: Ctx):
    x = ctx.tmp / "X"
    (x / "a").mkdir(parents=True)
    (x / "sibling.txt").write_text("keep me")
    proc = _generate(str(x / "a" / ".."), ctx.tmp)
    return proc, x


def _refused_and_nothing_deleted(result):
    proc, x = result
    assert proc.returncode == 2 and "non-empty folder that is not a cir-shapes benchmark" in proc.stderr
    assert (x / "sibling.txt").read_text() == "keep me" and (x / "a").is_dir()


def out_is_cwd_or_file(ctx: Ctx):
    (ctx.tmp / "f.txt").write_text("x")
    return _generate(".", ctx.tmp), _generate("f.txt", ctx.tmp), _generate("new", ctx.tmp), _generate("new", ctx.tmp)


def _dot_and_file_refused_previous_output_replaced(result):
    dot, file, first, again = result
    assert dot.returncode == 2 and "current folder" in dot.stderr
    assert file.returncode == 2 and "is a file" in file.stderr
    assert first.returncode == 0 and again.returncode == 0  # its own previous output is replaced


def person_file_in_previous_output(ctx: Ctx):
    """A person's file inside a previous output: its meta.json vouches for what that run wrote, not
    for the whole folder."""
    first = _generate("bench", ctx.tmp)
    (ctx.tmp / "bench" / "notes.txt").write_text("mine")
    (ctx.tmp / "bench" / "images" / "train" / "extra.png").write_bytes(b"not the generator's")
    return first, _generate("bench", ctx.tmp), ctx.tmp / "bench"


def _refused_naming_the_foreign_files(result):
    first, again, out = result
    assert first.returncode == 0 and again.returncode == 2, again.stderr
    assert "holds files this generator did not write (images/train/extra.png, notes.txt)" in again.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "meta.json").is_file()


# ---- 4, 6: the model store ---------------------------------------------------------------------------------


def _saved_model(ctx: Ctx, name: str = "m", seed: int = 0) -> tuple[Path, str]:
    import torch

    from model_code.backbone import load_backbone
    from model_code.model.cir_cot import CirCoTModel, apply_lora

    torch.manual_seed(seed)
    model, processor = load_backbone(ctx.micro_base, device="cpu")
    m = CirCoTModel(apply_lora(model, processor, r=2, alpha=4), processor, base_path=str(ctx.micro_base))
    with torch.no_grad():
        for n, p in m.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    path = ctx.tmp / name
    return path, m.save(path)


@pytest.fixture
def empty_store():
    """The session's model store without cir-cot entries, before and after (removed as files: a row
    may leave a damaged entry that BentoML's own delete cannot read)."""
    from model_code import registry

    shutil.rmtree(registry.store_path() / registry.MODEL_NAME, ignore_errors=True)
    yield registry
    shutil.rmtree(registry.store_path() / registry.MODEL_NAME, ignore_errors=True)


def truncated_model_yaml(ctx: Ctx):
    from model_code import registry

    (a, va), (b, vb) = _saved_model(ctx, "a", 1), _saved_model(ctx, "b", 2)
    registry.promote(a, version=va, dataset="synthetic", labels={})
    registry.promote(b, version=vb, dataset="synthetic", labels={})
    yaml_file = registry.store_path() / registry.MODEL_NAME / va / "model.yaml"
    yaml_file.write_text(yaml_file.read_text()[:60])
    from orchestration.__main__ import main

    return registry, vb, (main(["models"]), main(["models", "--verify"]))


def _broken_entry_reported_rest_works(result):
    registry, vb, codes = result
    assert codes == (0, 1)   # listed either way; a verification that met an unreadable entry fails
    assert [m["version"] for m in registry.list_models()] == [vb]
    assert len(registry.broken_entries()) == 1 and registry.production("synthetic")["version"] == vb
    with pytest.raises(LookupError, match="no archived"):  # the archived one is the broken one
        registry.rollback("synthetic")


def promote_unloadable(ctx: Ctx):
    from model_code import registry

    only_json = ctx.tmp / "only-json"
    only_json.mkdir()
    path, version = _saved_model(ctx)
    shutil.copy(path / "circot.json", only_json / "circot.json")
    outcomes = []
    for folder in (only_json,):
        try:
            registry.promote(folder, version="x1", dataset="synthetic", labels={})
        except FileNotFoundError as e:
            outcomes.append(str(e))
    gone = ctx.tmp / "gone-base"
    shutil.copytree(ctx.micro_base, gone)
    moved = ctx.tmp / "moved"
    shutil.copytree(path, moved)
    _edit_json(moved / "circot.json", lambda m: m.update(base_model=str(gone)))
    shutil.rmtree(gone)
    try:
        registry.promote(moved, version="x2", dataset="synthetic", labels={})
    except FileNotFoundError as e:
        outcomes.append(str(e))
    return registry, outcomes


def _refused_before_any_label(result):
    registry, outcomes = result
    assert len(outcomes) == 2 and "processor's tokenizer" in outcomes[0] and "base model's config" in outcomes[1]
    assert registry.list_models() == []


def demote_production(ctx: Ctx):
    from model_code import registry

    path, version = _saved_model(ctx)
    registry.promote(path, version=version, dataset="synthetic", labels={})
    return registry, version, registry.promote(path, version=version, dataset="synthetic", labels={},
                                               stage="candidate")


def _production_kept(result):
    registry, version, answer = result
    assert not answer["changed"] and "would leave synthetic without one" in answer["reason"]
    assert registry.production("synthetic")["version"] == version


# ---- 7, 8, 9: official files -------------------------------------------------------------------------------


def path_outside_root(ctx: Ctx):
    root = _copy_synthetic(ctx)
    _edit_json(root / "image_splits" / "split.test.json", lambda d: d.update({next(iter(d)): "../../x.png"}))
    from model_code.data import read_benchmark

    return read_benchmark("synthetic", root, "test", require_images=False)


def _fiq(ctx: Ctx, entries: list, split_ids=("B000", "B001")) -> Path:
    root = ctx.tmp / "fiq"
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    (root / "captions" / "cap.dress.val.json").write_text(json.dumps(entries))
    (root / "image_splits" / "split.dress.val.json").write_text(json.dumps(list(split_ids)))
    from model_code.data import read_benchmark

    return read_benchmark("fashioniq", root, "val", category="dress", require_images=False)


def _cirr(ctx: Ctx, change: Callable[[dict], None]):
    root = ctx.tmp / "cirr"
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    entry = {"pairid": 1, "reference": "a", "target_hard": "b", "target_soft": {"b": 1.0}, "caption": "make it red",
             "img_set": {"id": 3, "members": ["a", "b"], "reference_rank": 0, "target_rank": 1}}
    change(entry)
    (root / "captions" / "cap.rc2.val.json").write_text(json.dumps([entry]))
    (root / "image_splits" / "split.rc2.val.json").write_text(json.dumps({"a": "./dev/a.png", "b": "./dev/b.png"}))
    from model_code.data import read_benchmark

    return read_benchmark("cirr", root, "val", require_images=False)


def _circo(ctx: Ctx, change: Callable[[dict], None] = lambda e: None, info=None, gallery_files=()):
    root = ctx.tmp / "circo"
    (root / "annotations").mkdir(parents=True)
    entry = {"id": 0, "reference_img_id": 1, "target_img_id": 2, "relative_caption": "has a dog", "gt_img_ids": [2, 3],
             "shared_concept": "a dog"}
    change(entry)
    (root / "annotations" / "val.json").write_text(json.dumps([entry]))
    if info is not None:
        (root / "COCO2017_unlabeled" / "annotations").mkdir(parents=True)
        (root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json").write_text(json.dumps(info))
    for name in gallery_files:
        (root / "COCO2017_unlabeled" / "unlabeled2017").mkdir(parents=True, exist_ok=True)
        (root / "COCO2017_unlabeled" / "unlabeled2017" / name).write_bytes(b"x")
    from model_code.data import read_benchmark

    return read_benchmark("circo", root, "val", require_images=False)


def synthetic_hard_negatives_a_string(ctx: Ctx):
    root = _copy_synthetic(ctx)
    _edit_json(root / "captions" / "cap.test.json", lambda d: d[0].update(hard_negatives="test_000001"))
    from model_code.data import read_benchmark

    return read_benchmark("synthetic", root, "test", require_images=False)


# ---- 10: a damaged saved model, bad configuration -----------------------------------------------------------


def _damaged_model(ctx: Ctx, remove: str):
    from model_code.model.cir_cot import CirCoTModel

    path, _ = _saved_model(ctx)
    target = path / remove
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    return CirCoTModel.load(path, device="cpu")


def model_without_base(ctx: Ctx):
    from model_code.model.cir_cot import CirCoTModel

    base = ctx.tmp / "base"
    shutil.copytree(ctx.micro_base, base)
    path, _ = _saved_model(ctx)
    _edit_json(path / "circot.json", lambda m: m.update(base_model=str(base)))
    for f in base.glob("*.safetensors"):
        f.unlink()
    return CirCoTModel.load(path, device="cpu")


def bad_gate_variable(ctx: Ctx):
    env = {**os.environ, "CIRCOT_GATE_COT_TOLERANCE": "abc", "DAGSTER_HOME": str(ctx.tmp / "dh"),
           "BENTOML_HOME": str(ctx.tmp / "bh")}
    loads = subprocess.run([sys.executable, "-c", "import orchestration.definitions"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    run = subprocess.run([sys.executable, "-m", "orchestration", "run", "--dataset", "synthetic"], cwd=ctx.tmp,
                         env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    return loads, run


def _reported_when_a_run_starts(result):
    loads, run = result
    assert loads.returncode == 0, loads.stderr[-500:]          # the definitions load: no error at import
    assert run.returncode == 2 and "CIRCOT_GATE_COT_TOLERANCE='abc' is not a number" in run.stdout


def bad_step_counts(ctx: Ctx):
    from model_code.model.recipes import main

    codes = []
    for value in ("0", "-5", "x"):
        with pytest.raises(SystemExit) as e:
            main(["--tables", "t", "--annotations", "a", "--base", "b", "--out", "o", "--align-steps", value])
        codes.append(e.value.code)
    return codes


# ---- 11: pathological chains of thought ------------------------------------------------------------------------


def invisible_query(ctx: Ctx):
    from model_code.retrieval import check_text

    return check_text("\u200b\u200c\u2060\u00ad")


def repair_timing(ctx: Ctx):
    """repair() on pathological texts, timed against a same-run baseline rather than the clock: 9k
    blanks (what made the heading pattern backtrack) against 9k characters of ordinary words, each
    the fastest of 5 tries (a busy machine slows both alike); and the texts over the length limit
    refused without being read at all (``parse`` is never called)."""
    from unittest import mock

    from model_code import chain
    from model_code.chain import CoTFormatError, repair

    def fastest(text, tries=5):
        best = float("inf")
        for _ in range(tries):
            start = time.perf_counter()
            with pytest.raises(CoTFormatError) as e:
                repair(text)
            best = min(best, time.perf_counter() - start)
        return e.value.reason, best

    out = {"9k blanks": fastest(" " * 9000), "9k words": fastest("x " * 4500)}
    with mock.patch.object(chain, "parse", side_effect=AssertionError("read a text over the limit")) as parse:
        for name, text in (("32k blanks", " \t" * 16000), ("1 MB", "x " * 500_000)):
            with pytest.raises(CoTFormatError) as e:
                repair(text)
            out[name] = e.value.reason
        out["read"] = parse.call_count
    return out


def _fast_and_bounded(result):
    (blanks_reason, blanks), (words_reason, words) = result["9k blanks"], result["9k words"]
    assert blanks_reason == words_reason == "missing_section"
    # linear: about as fast as ordinary text of its length (the backtracking pattern took 20,000 times as long)
    assert blanks < 50 * words, (blanks, words)
    assert result["32k blanks"] == result["1 MB"] == "too_long" and result["read"] == 0


def invisible_sections(ctx: Ctx):
    from model_code.chain import parse

    return parse("<caption>\x00\x00</caption><reasoning>\u200b \u200d</reasoning><conclusion>c</conclusion>")


# ---- 12: the command line outside make -------------------------------------------------------------------------


def models_outside_make(ctx: Ctx):
    from model_code import registry

    project = ctx.tmp / "project"
    project.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("BENTOML_HOME", "DAGSTER_HOME")}
    env["BENTOML_HOME"] = str(project / ".bentoml")
    path, version = _saved_model(ctx)
    code = ("import sys; from model_code import registry; "
            f"registry.promote({str(path)!r}, version={version!r}, dataset='synthetic', labels={{}})")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=120)
    del env["BENTOML_HOME"]  # as a user's shell has it: no BENTOML_HOME, in the project folder
    listed = subprocess.run([sys.executable, "-m", "orchestration", "models"], cwd=project,
                            env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert registry.list_models() == []  # the session's store (emptied for each row) is untouched by this row
    return listed, version, project


def _finds_the_projects_store(result):
    listed, version, project = result
    assert listed.returncode == 0, listed.stderr[-500:]
    assert f"BentoML model store: {project / '.bentoml' / 'models'}" in listed.stdout
    assert f"cir-cot:{version}" in listed.stdout and "production" in listed.stdout


FAULTS = [
    # 1, 2: the annotation store
    ("two annotation runs write one store at once", two_writers_at_once, Outcome(_all_rows_kept)),
    ("a truncated and a zero-byte part in the annotation store", corrupt_part, Outcome(_quarantined_and_reannotated)),
    ("another table's Parquet file and a folder named like annotation parts", foreign_part_and_folder,
     Outcome(_foreign_quarantined_rows_intact)),
    # 3: the generator never deletes what it did not make
    ("synthetic --out X/a/.. where X holds other files", out_through_dotdot, Outcome(_refused_and_nothing_deleted)),
    ("synthetic --out . / a file / its own previous output", out_is_cwd_or_file,
     Outcome(_dot_and_file_refused_previous_output_replaced)),
    ("synthetic --out over its previous output holding a person's files", person_file_in_previous_output,
     Outcome(_refused_naming_the_foreign_files)),
    # 4, 6: the model store
    ("a truncated model.yaml in the model store", truncated_model_yaml, Outcome(_broken_entry_reported_rest_works)),
    ("promote a folder with only circot.json / an adapter whose base is gone", promote_unloadable,
     Outcome(_refused_before_any_label)),
    ("promote the production model as candidate", demote_production, Outcome(_production_kept)),
    # 7, 8, 9: official files
    ("an image path ../../x.png in a split file", path_outside_root, Error(Exception, r"leaves the dataset root")),
    ("FashionIQ captions ['', ' ']",
     lambda c: _fiq(c, [{"candidate": "B000", "target": "B001", "captions": ["", " "]}]),
     Error(Exception, r"cap\.dress\.val\.json: entry 0: field 'captions': both captions are empty")),
    ("FashionIQ captions of only zero-width and bidi characters",
     lambda c: _fiq(c, [{"candidate": "B000", "target": "B001", "captions": ["\u200b\u2060", "\u200e\ufeff"]}]),
     Error(Exception, r"cap\.dress\.val\.json: entry 0: field 'captions': both captions are empty")),
    ("a query whose modification is only zero-width characters", invisible_query,
     Error(Exception, r"the modification text is empty")),
    ("FashionIQ captions ['', 'is red']",
     lambda c: _fiq(c, [{"candidate": "B000", "target": "B001", "captions": ["", "is red"]}]),
     Outcome(lambda b: b.triplets.modification.tolist() == ["is red"] or pytest.fail(str(b.triplets.modification)))),
    ("FashionIQ caption that is a number",
     lambda c: _fiq(c, [{"candidate": "B000", "target": "B001", "captions": [3, "x"]}]),
     Error(Exception, r"entry 0: field 'captions\.0': input should be a valid string \(got 3 of type int\)")),
    ("FashionIQ split file with a number", lambda c: _fiq(c, [], split_ids=("B000", 7)),
     Error(Exception, r"split\.dress\.val\.json: entry 1: expected an image ASIN")),
    ("CIRR val entry with a null target", lambda c: _cirr(c, lambda e: e.update(target_hard=None)),
     Error(Exception, r"cap\.rc2\.val\.json: entry 0 \(pairid 1\): field 'target_hard' is missing or null")),
    ("CIRR img_set a list", lambda c: _cirr(c, lambda e: e.update(img_set=["a", "b"])),
     Error(Exception, r"entry 0: field 'img_set': input should be a valid dictionary")),
    ("CIRR caption a number", lambda c: _cirr(c, lambda e: e.update(caption=5)),
     Error(Exception, r"entry 0: field 'caption': input should be a valid string \(got 5 of type int\)")),
    ("CIRCO gt_img_ids a number", lambda c: _circo(c, lambda e: e.update(gt_img_ids=7)),
     Error(Exception, r"annotations/val\.json: entry 0: field 'gt_img_ids': input should be a valid list")),
    ("CIRCO info file without images", lambda c: _circo(c, info={"licenses": []}),
     Error(Exception, r"image_info_unlabeled2017\.json: has no field 'images'")),
    ("a stray non-COCO file in the CIRCO gallery", lambda c: _circo(c, gallery_files=("000000000001.jpg", "notes.txt")),
     Outcome(lambda b: list(b.images.image_id) == ["1"] or pytest.fail(str(list(b.images.image_id))))),
    ("cir-shapes hard_negatives a string", synthetic_hard_negatives_a_string,
     Error(Exception, r"cap\.test\.json: entry 0: field 'hard_negatives': input should be a valid list")),
    # 10: a damaged saved model, bad configuration
    ("a saved model without its adapter weights", lambda c: _damaged_model(c, "adapter/adapter_model.safetensors"),
     Error(FileNotFoundError, r"the adapter's weights .*adapter_model\.safetensors is missing")),
    ("a saved model without its processor", lambda c: _damaged_model(c, "processor"),
     Error(FileNotFoundError, r"the processor's tokenizer .*tokenizer\.json is missing")),
    ("a saved model whose base has no weights", model_without_base,
     Error(FileNotFoundError, r"its base model .* has no weights")),
    ("CIRCOT_GATE_COT_TOLERANCE=abc", bad_gate_variable, Outcome(_reported_when_a_run_starts)),
    ("train --align-steps 0 / -5 / x", bad_step_counts,
     Outcome(lambda codes: codes == [2, 2, 2] or pytest.fail(str(codes)))),
    # 11: pathological chains of thought
    ("repair() on 9k, 32k blanks and 1 MB of text", repair_timing, Outcome(_fast_and_bounded)),
    ("sections of NULs and zero-width characters", invisible_sections, Error(Exception, r"empty_section")),
    # 12: the command line outside make
    ("`python -m orchestration models` outside make", models_outside_make, Outcome(_finds_the_projects_store)),
]


@pytest.mark.parametrize("name,action,expected", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault(name, action, expected, tmp_path, tiny_synthetic, micro_base, empty_store):
    ctx = Ctx(tmp_path, tiny_synthetic, micro_base)
    if isinstance(expected, Error):
        with pytest.raises(expected.type, match=expected.match):
            action(ctx)
    else:
        expected.check(action(ctx))


def test_every_row_is_named_once():
    assert len({f[0] for f in FAULTS}) == len(FAULTS)


@pytest.mark.parametrize("name,value,says", [
    ("CIRCOT_GATE_COT_CONFIDENCE", "nan", "is out of range"),
    ("CIRCOT_GATE_COT_TOLERANCE", "nan", "is out of range"),
    ("CIRCOT_GATE_MAX_REGRESSION", "inf", "is out of range"),
    ("CIRCOT_GATE_MAX_REGRESSION", "-0.1", "is out of range"),
    ("CIRCOT_TRAINING_PROCESSES", "2.7", "is not a whole number of at least 1"),
    ("CIRCOT_TRAINING_PROCESSES", "0", "is not a whole number of at least 1"),
    ("CIRCOT_K8S_GPUS", "0.5", "is not a whole number of at least 0"),
    ("CIRCOT_GATE_COT_NOT_WORSE", "perhaps", "is not one of 1, true"),
    ("CIRCOT_ARTIFACTS", "", "is set but empty"),
    ("CIRCOT_GATE_FLOORS", '{"synthetic": {"R@10": "high"}}', "synthetic.'R@10': 'high' is not a number from 0 to 1"),
    ("CIRCOT_GATE_FLOORS", '{"R@10": NaN}', "'R@10': nan is not a number from 0 to 1"),
    ("CIRCOT_GATE_FLOORS", '[0.5]', "must be a JSON object"),
    ("CIRCOT_GATE_FLOORS", '{"R@10": ', "is not valid JSON"),
    ("CIRCOT_RETRAIN_CRON", "every monday", "is not a cron expression"),
])
def test_every_unusable_setting_is_named_with_its_value_before_a_run(monkeypatch, name, value, says):
    from model_code.settings import environment_errors

    monkeypatch.setenv(name, value)
    errors = environment_errors()
    assert len(errors) == 1 and errors[0].startswith(name) and says in errors[0], errors


def test_usable_settings_pass_and_floors_merge_over_the_defaults(monkeypatch):
    from model_code.benchmarks import benchmark
    from model_code.evaluation.gate import gate_floors
    from model_code.settings import environment_errors

    for name, value in (("CIRCOT_GATE_COT_NOT_WORSE", "off"), ("CIRCOT_TRAINING_PROCESSES", "2"),
                        ("CIRCOT_GATE_COT_CONFIDENCE", "0.9"), ("CIRCOT_RETRAIN_CRON", "0 4 * * *"),
                        ("CIRCOT_GATE_FLOORS", '{"R@50": 0.2, "cirr": {"Avg": 0.6}}')):
        monkeypatch.setenv(name, value)
    assert environment_errors() == []
    # a floor for another dataset, or for every dataset, never removes the built-in ones
    synthetic = dict(benchmark("synthetic").gate_floors)
    assert gate_floors("synthetic", '{"cirr": {"Avg": 0.6}}') == synthetic
    assert gate_floors("synthetic", '{"R@50": 0.2, "cirr": {"Avg": 0.6}}') == {**synthetic, "R@50": 0.2}
    assert gate_floors("cirr", '{"R@50": 0.2, "cirr": {"Avg": 0.6}}') == {"R@50": 0.2, "Avg": 0.6}
    assert gate_floors("synthetic", '{"synthetic": {"R@1": 0.3}}') == {**synthetic, "R@1": 0.3}
    from model_code.settings import PipelineSettings, load

    assert load(PipelineSettings)[0].gate_cot_not_worse is False


def test_a_full_disk_is_named_as_such_and_leaves_no_temporary_checkpoint(tmp_path, monkeypatch):
    from collections import namedtuple

    import torch

    from model_code.common import DiskFullError
    from model_code.model import train

    layer = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(layer.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = tmp_path / "run" / "checkpoint"
    train._save_checkpoint(ckpt, layer, opt, sched, 1, [{"step": 1}])      # a good checkpoint to keep

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(DiskFullError, match=r"no space left on the device holding .*checkpoint \(1 MB free\)"):
        train._save_checkpoint(ckpt, layer, opt, sched, 2, [{"step": 1}, {"step": 2}])
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint"]          # no .tmp left
    assert json.loads((ckpt / "history.json").read_text()) == [{"step": 1}]         # the last good one kept
    # the same failure with room on the disk is the writer's own error, unchanged
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match="inline_container"):
        train._save_checkpoint(ckpt, layer, opt, sched, 2, [{"step": 1}, {"step": 2}])
