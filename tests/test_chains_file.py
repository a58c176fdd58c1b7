"""The file teacher: chains written elsewhere (JSON Lines by query id) judged, stored and rejected like a
teacher's; the file errors it refuses; the placeholder chains made from query texts; the annotator
resource that picks and builds it; ``circot chains-from-text``."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from assets.resources import AnnotatorResource, resources_from_environment
from model_code.annotation.chains_file import (
    ChainsFileError,
    FileTeacher,
    chains_from_text,
    placeholder_chain,
    write_chains_file,
)
from model_code.annotation.judge import UNKNOWN_QUERY, AnnotationRequest, judge
from model_code.annotation.store import AnnotationStore, annotate_missing
from model_code.benchmarks import benchmark
from model_code.chain import CoT
from model_code.data import read_dataset
from orchestration.__main__ import main
from tests.conftest import shared_benchmark

GOOD = "<caption>a red dress</caption><reasoning>the request asks for blue; the cut stays</reasoning>" \
       "<conclusion>a blue dress of the same cut</conclusion>"


def _jsonl(path: Path, *objects, raw: str = "") -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objects) + raw, encoding="utf-8")
    return path


def _request(query_id: str, key: str | None = None) -> AnnotationRequest:
    return AnnotationRequest(query_id, Path("ref.png"), Path("target.png"), "make it blue", key or f"key-{query_id}")


@pytest.fixture
def chains(tmp_path) -> Path:
    return _jsonl(
        tmp_path / "chains.jsonl",
        {"query_id": "whole", "chain": GOOD + "\n<emb>"},
        {"query_id": "sections", "caption": "a red dress", "reasoning": "blue asked; the cut stays",
         "conclusion": "a blue dress"},
        {"query_id": "empty", "chain": "  "},
        {"query_id": "malformed", "chain": "a blue dress, I think"},
        {"query_id": "leaks", "chain": GOOD.replace("the cut stays", "as the target image shows")},
        {"query_id": "repeats", "caption": "a red dress", "reasoning": "nothing changes", "conclusion": "A red dress."},
        {"query_id": "blank section", "caption": "a red dress", "reasoning": "", "conclusion": "a blue dress"},
        raw="\n   \n",   # blank lines are skipped
    )


def test_each_chain_is_judged_and_an_unknown_query_is_rejected_as_such(chains):
    teacher = FileTeacher(chains)
    assert teacher.name == "file:chains.jsonl" and teacher.default_min_acceptance == 0.95
    assert teacher.prompt_version.startswith("chains-") and len(teacher.prompt_version) == len("chains-") + 12
    ids = ["whole", "sections", "empty", "malformed", "leaks", "repeats", "blank section", "not in the file"]
    rows = teacher.annotate([_request(q) for q in ids])
    got = {r.query_id: (r.status, r.reject_reason) for r in rows}
    assert got == {
        "whole": ("ok", None), "sections": ("ok", None),
        "empty": ("rejected", "empty_answer"), "malformed": ("rejected", "missing_section"),
        "leaks": ("rejected", "leakage: target image"), "repeats": ("rejected", "conclusion_repeats_caption"),
        "blank section": ("rejected", "empty_section"), "not in the file": ("rejected", UNKNOWN_QUERY),
    }
    whole, sections = rows[0], rows[1]
    assert (whole.caption, whole.conclusion, whole.repairs) == ("a red dress", "a blue dress of the same cut", "")
    assert "<emb>" not in whole.raw   # the embedding token may end a chain in the file; it is not part of it
    assert sections.raw == CoT("a red dress", "blue asked; the cut stays", "a blue dress").render()
    assert all(r.teacher == teacher.name and r.prompt_version == teacher.prompt_version for r in rows)


def test_through_the_store_rejections_are_kept_unknown_ids_are_not_and_a_changed_file_rejudges(chains, tmp_path):
    store = AnnotationStore(tmp_path / "store")
    requests = [_request(q) for q in ("whole", "sections", "leaks", "stranger")]
    first = annotate_missing(store, FileTeacher(chains), requests, progress=lambda _: None)
    assert (first.annotated, first.ok, first.rejected, first.unknown) == (3, 2, 1, 1)
    table = store.table()
    assert sorted(table.query_id) == ["leaks", "sections", "whole"]
    assert table.set_index("query_id").loc["leaks", "reject_reason"] == "leakage: target image"

    again = annotate_missing(store, FileTeacher(chains), requests, progress=lambda _: None)
    assert (again.already_done, again.annotated, again.unknown) == (3, 0, 1)   # unchanged file: nothing new

    with chains.open("a") as f:
        f.write(json.dumps({"query_id": "stranger", "chain": GOOD}) + "\n")
    changed = FileTeacher(chains)
    assert changed.prompt_version != table.prompt_version[0]
    rerun = annotate_missing(store, changed, requests, progress=lambda _: None)
    assert (rerun.already_done, rerun.annotated, rerun.ok, rerun.unknown) == (0, 4, 3, 0)


@pytest.mark.parametrize("content, expected", [
    ('{"query_id": "a", "chain": "x"}\n{"query_id": "b", "chain": \n', "line 2: not valid JSON"),
    ('\n["a", "x"]\n', "line 2: expected a JSON object, got list"),
    ('{"chain": "x"}\n', "line 1: no 'query_id'"),
    ('{"query_id": "  ", "chain": "x"}\n', "line 1: 'query_id' is '  '"),
    ('{"query_id": 7, "chain": "x"}\n', "line 1: 'query_id' is 7"),
    ('{"query_id": "a"}\n', "line 1: neither 'chain' nor all three sections"),
    ('{"query_id": "a", "caption": "c", "reasoning": "r"}\n', "missing 'conclusion'"),
    ('{"query_id": "a", "caption": "c", "reasoning": 3, "conclusion": "k"}\n', "line 1: 'reasoning' is int"),
    ('{"query_id": "a", "chain": ["x"]}\n', "line 1: 'chain' is list"),
    ('{"query_id": "a", "chain": "x", "caption": "c"}\n', "line 1: has both 'chain' and 'caption'"),
    ('{"query_id": "a", "chain": "x"}\n\n{"query_id": "a", "chain": "y"}\n',
     "line 3: query 'a' already has a different chain (line 1)"),
    ("\n  \n", "no chains in the file"),
])
def test_an_unusable_file_names_itself_and_the_line(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ChainsFileError) as e:
        FileTeacher(path)
    assert str(path) in str(e.value) and expected in str(e.value), str(e.value)


def test_a_missing_file_is_refused_and_the_same_chain_twice_is_fine(tmp_path):
    with pytest.raises(ChainsFileError, match="does not exist"):
        FileTeacher(tmp_path / "nowhere.jsonl")
    same = _jsonl(tmp_path / "twice.jsonl", {"query_id": "a", "chain": GOOD},
                  {"query_id": "a", "chain": GOOD + "<emb>"})
    assert FileTeacher(same).chains == {"a": GOOD}


def test_write_chains_file_round_trips_through_the_file_teacher(tmp_path):
    rows = [{"query_id": "q1", "chain": GOOD}, {"query_id": "é 2", "chain": GOOD.replace("red", "rouge")}]
    path = write_chains_file(rows, tmp_path / "out" / "chains.jsonl")
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows
    assert sorted(p.name for p in path.parent.iterdir()) == ["chains.jsonl"]   # no temporary file left
    assert FileTeacher(path).chains == {r["query_id"]: r["chain"] for r in rows}


# ---------------------------------------------------------------------------------------------
# placeholder chains from the queries' own texts


def test_placeholder_chains_come_from_the_text_and_pass_the_judge():
    triplets = pd.DataFrame({
        "query_id": ["d1", "c1", "c2", "c3"],
        "category": ["dress", None, None, None],
        "modification": ["is shorter and  black", "The target photo has two dogs", "<caption>odd</caption> text",
                         "long " * 400],
    })
    rows = chains_from_text(triplets)
    assert [r["query_id"] for r in rows] == ["d1", "c1", "c2", "c3"]
    verdicts = [judge(r["query_id"], "file", "v", r["chain"]) for r in rows]
    assert all(v.ok and not v.repairs for v in verdicts), [(v.reject_reason, v.repairs) for v in verdicts]
    dress, photo = verdicts[0], verdicts[1]
    assert dress.caption == "the reference dress" and dress.conclusion.endswith("as asked: is shorter and black")
    assert "the request asks: is shorter and black" in dress.reasoning
    assert verdicts[2].caption == "the reference image" and "result has two dogs" in photo.conclusion
    assert chains_from_text(triplets.drop(columns="category"))[0]["chain"] == placeholder_chain(
        "is shorter and black").render()


def _dress_only(tmp_path) -> Path:
    """The shared FashionIQ folder holds the dress category: its val files, and empty shirt and toptee ones."""
    source, root = shared_benchmark("fashioniq"), tmp_path / "fashioniq"
    for folder, name in (("captions", "cap.{}.val.json"), ("image_splits", "split.{}.val.json")):
        (root / folder).mkdir(parents=True)
        for category in benchmark("fashioniq").categories:
            dress = source / folder / name.format("dress")
            (root / folder / name.format(category)).write_bytes(dress.read_bytes() if category == "dress" else b"[]")
    return root


@pytest.mark.parametrize("name", ["cirr", "circo", "fashioniq"])
def test_placeholder_chains_of_the_real_annotation_files_all_pass_the_judge(name, tmp_path):
    root = _dress_only(tmp_path) if name == "fashioniq" else shared_benchmark(name)
    triplets = read_dataset(name, root, ["val"], require_images=False).triplets
    rows = chains_from_text(triplets)
    assert len(rows) == len(triplets) > 100
    rejected = [(r["query_id"], v.reject_reason) for r in rows
                for v in [judge(r["query_id"], "file", "v", r["chain"])] if not v.ok]
    assert not rejected, rejected[:5]
    thing = "dress" if name == "fashioniq" else "image"
    assert all(r["chain"].startswith(f"<caption>the reference {thing}</caption>") for r in rows)


# ---------------------------------------------------------------------------------------------
# the annotator resource


def test_auto_picks_the_oracle_then_the_chains_file_and_substitutes_the_dataset(tmp_path):
    _jsonl(tmp_path / "cirr.jsonl", {"query_id": "q", "chain": GOOD})
    resource = AnnotatorResource(chains_file=str(tmp_path / "{dataset}.jsonl"), local_model_path="/models/teacher",
                                 remote_base_url="http://teacher:8000/v1")
    assert resource.resolve_kind("synthetic") == "oracle"
    assert resource.resolve_kind("cirr") == "file"
    teacher = resource.build("cirr", str(tmp_path))
    assert isinstance(teacher, FileTeacher) and teacher.path == tmp_path / "cirr.jsonl"
    assert AnnotatorResource(local_model_path="/m").resolve_kind("cirr") == "local"

    with pytest.raises(dg.Failure) as missing:
        resource.build("circo", str(tmp_path))
    assert "CIRCOT_TEACHER_CHAINS" in missing.value.description and str(tmp_path / "circo.jsonl") in \
        missing.value.description
    (tmp_path / "fashioniq.jsonl").write_text("not json\n")
    with pytest.raises(dg.Failure, match="line 1: not valid JSON"):
        resource.build("fashioniq", str(tmp_path))
    with pytest.raises(dg.Failure, match="CIRCOT_TEACHER_CHAINS"):
        AnnotatorResource(kind="file").build("cirr", str(tmp_path))
    with pytest.raises(dg.Failure) as none:
        AnnotatorResource().resolve_kind("cirr")
    assert "CIRCOT_TEACHER_CHAINS" in none.value.description


def test_the_environment_sets_the_file_teacher(monkeypatch, tmp_path):
    monkeypatch.setenv("CIRCOT_TEACHER", "file")
    monkeypatch.setenv("CIRCOT_TEACHER_CHAINS", str(tmp_path / "{dataset}.jsonl"))
    annotator = resources_from_environment()["annotator"]
    assert (annotator.kind, annotator.chains_file) == ("file", str(tmp_path / "{dataset}.jsonl"))


# ---------------------------------------------------------------------------------------------
# circot chains-from-text


@pytest.fixture
def circo_root(tmp_path) -> Path:
    """A CIRCO folder of three queries: two in val, one in the hidden test split."""
    root = tmp_path / "circo"
    (root / "annotations").mkdir(parents=True)
    val = [{"id": i, "reference_img_id": 10 + i, "target_img_id": 20 + i, "gt_img_ids": [20 + i],
            "relative_caption": text, "shared_concept": "a dog"}
           for i, text in enumerate(["has a red hat", "is at night"])]
    test = [{"id": 5, "reference_img_id": 15, "relative_caption": "shows two of them", "shared_concept": "a cat"}]
    (root / "annotations" / "val.json").write_text(json.dumps(val))
    (root / "annotations" / "test.json").write_text(json.dumps(test))
    return root


def test_chains_from_text_writes_a_file_the_file_teacher_accepts(circo_root, tmp_path, capsys):
    out = tmp_path / "chains" / "circo.jsonl"
    assert main(["chains-from-text", "--dataset", "circo", "--root", str(circo_root), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"wrote 2 chains (circo: val 2) to {out}" in said and "no knowledge of the images" in said
    teacher = FileTeacher(out)
    assert sorted(teacher.chains) == ["val-0", "val-1"]   # the hidden test split's query has no target
    assert all(r.ok for r in teacher.annotate([_request("val-0"), _request("val-1")]))

    assert main(["chains-from-text", "--dataset", "circo", "--root", str(circo_root), "--out", str(out),
                 "--splits", "test"]) == 0
    assert sorted(FileTeacher(out).chains) == ["test-5"]


@pytest.mark.parametrize("args, expected", [
    (["--dataset", "imagenet", "--root", "{root}"], "unknown dataset 'imagenet'"),
    (["--dataset", "circo", "--root", "{root}/nowhere"], "does not exist"),
    (["--dataset", "circo", "--root", "{root}", "--splits", "train"], "circo"),
    (["--dataset", "cirr", "--root", "{root}"], "cirr: no annotation files"),
])
def test_chains_from_text_errors_are_one_line_and_exit_2(circo_root, tmp_path, capsys, args, expected):
    argv = ["chains-from-text", "--out", str(tmp_path / "out.jsonl")] + [a.format(root=circo_root) for a in args]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and expected in captured.err, captured.err
    assert captured.err.startswith("chains-from-text: ") and "Traceback" not in captured.err
    assert not (tmp_path / "out.jsonl").exists()


def test_chains_from_text_reports_a_broken_annotation_file(circo_root, tmp_path, capsys):
    (circo_root / "annotations" / "val.json").write_text("[{")
    assert main(["chains-from-text", "--dataset", "circo", "--root", str(circo_root), "--out",
                 str(tmp_path / "out.jsonl"), "--splits", "val"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "val.json is not valid JSON" in err, err
