"""The bench scripts (bench/): each imports, builds its parser without doing any work, and names only
library objects, arguments and options that exist, so a rename in the library fails here and not in a
script months later. Their small pure helpers are checked on constructed cases."""

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["correction_loop", "diagnose_embedded", "encoder_throughput", "finetune_embedded", "gpu_decode", "gpu_train",
           "index_scale", "load_service", "pretrain_budget", "same_picture", "teacher_throughput"]
LIBRARY = ("model_code", "bench")


def test_every_bench_script_is_checked_here():
    helpers = {"__init__", "_common", "locustfile"}
    assert {p.stem for p in (REPO / "bench").glob("*.py")} - helpers == set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_script_imports_and_its_help_exits_before_any_work(name, capsys):
    """``main(argv)`` parses ``argv`` (not pytest's own command line) before it does anything."""
    module = importlib.import_module(f"bench.{name}")
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: ")
    assert " ".join(module.__doc__.split("\n\n")[0].split()) in out  # the docstring's summary is the description


# ---- the library names the scripts use --------------------------------------------------------------------


def _resolve(module: str, name: str):
    mod = importlib.import_module(module)
    if hasattr(mod, name):
        return getattr(mod, name)
    return importlib.import_module(f"{module}.{name}")  # a submodule not imported by its package


def _imports(nodes) -> tuple[dict, list[str]]:
    """{bound name: object} of the library imports among ``nodes``, and the imports that fail."""
    bound, problems = {}, []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARY:
            for alias in node.names:
                try:
                    bound[alias.asname or alias.name] = _resolve(node.module, alias.name)
                except ImportError:
                    problems.append(f"line {node.lineno}: from {node.module} import {alias.name}: no such name")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARY:
                    try:
                        importlib.import_module(alias.name)
                    except ImportError as e:
                        problems.append(f"line {node.lineno}: import {alias.name}: {e}")
    return bound, problems


def _uses(nodes, bound: dict) -> list[str]:
    """What ``nodes`` ask of the objects in ``bound`` and they lack: an attribute (``scenes.scene_key``),
    or a keyword argument of a call (``TrainConfig(stage=...)``, ``registry.promote(version=...)``)."""
    problems = []
    for node in nodes:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            if not hasattr(bound[node.value.id], node.attr):
                problems.append(f"line {node.lineno}: {node.value.id}.{node.attr} does not exist")
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in bound:
                target, shown = bound[f.id], f.id
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in bound:
                target, shown = getattr(bound[f.value.id], f.attr, None), f"{f.value.id}.{f.attr}"
            else:
                continue
            try:
                params = inspect.signature(target).parameters
            except (TypeError, ValueError):
                continue
            if any(p.kind is p.VAR_KEYWORD for p in params.values()):
                continue
            problems += [f"line {node.lineno}: {shown}() takes no argument {k.arg!r}"
                         for k in node.keywords if k.arg is not None and k.arg not in params]
    return problems


def library_problems(source: str) -> list[str]:
    """Every library import of ``source`` (at the top or inside a function), and each attribute and
    keyword argument it takes from them, checked against the library as it is now."""
    tree = ast.parse(source)
    top, problems = _imports(tree.body)
    functions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    module_level = [n for stmt in tree.body if stmt not in functions for n in ast.walk(stmt)]
    problems += _uses(module_level, top)
    for fn in functions:
        nodes = list(ast.walk(fn))
        own, failed = _imports(nodes)
        assigned = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        bound = {k: v for k, v in top.items() if k not in assigned} | own
        problems += failed + _uses(nodes, bound)
    return problems


@pytest.mark.parametrize("name", SCRIPTS + ["_common"])
def test_the_script_uses_only_library_names_that_exist(name):
    source = (REPO / "bench" / f"{name}.py").read_text()
    assert library_problems(source) == []
    if name == "load_service":  # the store's set-up runs as a program of its own
        from bench.load_service import SETUP

        assert library_problems(SETUP) == []


def test_the_name_check_finds_a_renamed_function_attribute_and_argument():
    source = """
from model_code.evaluation.metrics import recall_at_k, no_such_function
from model_code.synthetic import scenes

def f():
    from model_code.index import AnnConfig
    scenes.scene_key(())
    scenes.no_such_helper()
    AnnConfig(index_type="IVF_PQ", partitions=4)
    recall_at_k([], [], ks=[1])
"""
    assert sorted(library_problems(source)) == [
        "line 2: from model_code.evaluation.metrics import no_such_function: no such name",
        "line 8: scenes.no_such_helper does not exist",
        "line 9: AnnConfig() takes no argument 'partitions'",
    ]


def test_the_library_objects_the_scripts_use_keep_the_members_they_read():
    """What the scripts read of objects the library hands them (instances: not visible to the check above)."""
    from model_code.annotation.teachers import GenerationStats, LocalTeacher
    from model_code.evaluation.evaluate import Evaluation
    from model_code.evaluation.gate import Check, Verdict
    from model_code.index import AnnConfig
    from model_code.model.cir_cot import CirCoTModel
    from model_code.model.recipes import TrainedModel, TrainingProfile

    def fields(cls):   # a dataclass or a pydantic model (the typed records)
        model_fields = getattr(cls, "model_fields", None)
        return set(model_fields) if model_fields is not None else {f.name for f in dataclasses.fields(cls)}

    for method in ("embed_queries", "embed_texts", "embed_images", "generate_cots", "infer_queries", "prompt",
                   "encode", "query_inputs", "gallery_inputs", "emb"):
        assert callable(getattr(CirCoTModel, method, None)), method
    assert callable(LocalTeacher.annotate) and {"new_tokens", "seconds"} <= fields(GenerationStats)
    assert callable(AnnConfig.create) and {"nprobes", "refine_factor"} <= fields(AnnConfig)
    assert {"metrics", "per_query", "strata", "queries", "reasoning"} <= fields(Evaluation)
    assert isinstance(inspect.getattr_static(Evaluation, "headline"), property)
    assert {"passed", "checks"} <= fields(Verdict) and {"name", "passed", "detail"} <= fields(Check)
    assert {"path", "stages"} <= fields(TrainedModel) and {"lora", "align", "cot"} <= fields(TrainingProfile)


def test_the_pretraining_options_the_budget_script_sets_exist(capsys):
    from bench.pretrain_budget import PROBE, _main_args
    from model_code.model import pretrain

    with pytest.raises(SystemExit):
        pretrain.main(["--help"])
    help_text = capsys.readouterr().out
    flags = [a for a in _main_args([], out="o", steps=1, eval_every=1, **PROBE) if a.startswith("--")]
    assert len(flags) == 6
    for flag in flags:
        assert re.search(rf"(?<![\w-]){flag}\b", help_text), flag


# ---- the scripts' pure helpers ---------------------------------------------------------------------------


def test_the_stand_in_image_is_discs_on_the_light_background():
    from bench._common import random_image

    img = random_image(random.Random(1), 64)
    assert img.size == (64, 64) and img.getpixel((0, 0)) == (245, 245, 240)
    colours = {c for _, c in img.getcolors(64 * 64)}
    assert len(colours) >= 2  # at least one disc is drawn
    assert random_image(random.Random(1), 64).tobytes() == img.tobytes()  # the seed decides it


def test_the_closing_table_prints_a_missing_value_as_the_rows_error(capsys):
    from bench._common import print_table

    print_table([{"mode": "a", "x": 1.5}, {"mode": "b", "error": "out of memory"}, {"mode": "c"}],
                [("mode", "mode"), ("x/s", "x")])
    assert capsys.readouterr().out == ("\n| mode | x/s |\n|---|---|\n| a | 1.5 |\n| b | out of memory |\n"
                                       "| c | - |\n")


def test_the_skills_table_splits_each_row_by_edit_count():
    from bench.diagnose_embedded import skills_table

    table = skills_table({"caption": [True, False, True, True], "of right captions": [True, False]}, [1, 2, 2, 3])
    assert table.splitlines() == [
        "| | all | 1 edit | 2 edits | 3 edits |",
        "|---|---|---|---|---|",
        "| caption | 0.750 | 1.000 (n=1) | 0.500 (n=2) | 1.000 (n=1) |",
        "| of right captions | 0.500 | n=2 |  |  |",
    ]


def test_the_resolution_table_gives_each_kind_of_phrase_and_where_wrong_texts_first_err():
    from bench.diagnose_embedded import resolution_table
    from model_code.synthetic.resolution import resolution_scores

    truth = ("<reasoning>The yellow shape is middle left: small yellow triangle; it becomes middle left: small red "
             "triangle.</reasoning>\n<conclusion>middle left: small red triangle.</conclusion>")
    wrong = truth.replace("The yellow shape is middle left", "The yellow shape is top left")
    lines = resolution_table({"edit": resolution_scores([truth, wrong], [truth, truth])}).splitlines()
    header = [c.strip() for c in lines[2].split("|")[1:-1]]
    row = dict(zip(header, (c.strip() for c in lines[4].split("|")[1:-1])))
    assert row[""] == "edit" and row["all"] == "0.500 (n=2)" and row["colour"] == "0.500 (n=2)"
    assert row["size"] == "" and row["wrong texts"] == "1"
    assert row["first error: resolution"] == "1.000" and row["first error: result"] == "0.000"


def test_the_fine_tuning_options_set_the_profiles_stages():
    from bench.finetune_embedded import configure, main, parser
    from model_code.model.recipes import PROFILES

    args = parser().parse_args(["--base", "b", "--align-steps", "7", "--seed", "3", "--lr", "0.002",
                                "--set", "cot.lambda_info=0.5", "--set", "align.identity_queries=no",
                                "--set", "cot.steps=11"])
    profile = configure(PROFILES["embedded"], args)
    assert (profile.align.steps, profile.align.seed, profile.align.lr) == (7, 3, 0.002)
    assert (profile.cot.steps, profile.cot.seed, profile.cot.lr, profile.cot.lambda_info) == (11, 3, 0.002, 0.5)
    assert profile.align.identity_queries is False and PROFILES["embedded"].align.identity_queries is True
    with_lora = PROFILES["embedded"].with_overrides(lora=True)
    assert configure(with_lora, parser().parse_args(["--base", "b"])).lora is True
    assert configure(with_lora, parser().parse_args(["--base", "b", "--full"])).lora is False
    with pytest.raises(ValueError, match="--set: 'cot.nosuch=1': TrainConfig has no field 'nosuch'"):
        configure(PROFILES["embedded"], parser().parse_args(["--base", "b", "--set", "cot.nosuch=1"]))
    with pytest.raises(ValueError, match="--set: 'cot.lr=fast'"):
        configure(PROFILES["embedded"], parser().parse_args(["--base", "b", "--set", "cot.lr=fast"]))
    with pytest.raises(SystemExit) as stop:  # the command line says so and stops before reading any data
        main(["--base", "b", "--data", "/nonexistent", "--set", "stage3.lr=1"])
    assert stop.value.code == 2


def test_each_decoding_mode_asks_generate_for_its_cache():
    from bench.gpu_decode import MODES, mode_kwargs

    assert {m: mode_kwargs(m) for m in MODES} == {
        "dynamic": {},
        "static": {"cache_implementation": "static", "disable_compile": True},
        "static+compile": {"cache_implementation": "static"},
    }


def test_the_training_benchs_chain_of_thought_parses_with_the_words_asked_for():
    from bench.gpu_train import cot_text
    from model_code.chain import parse

    cot = parse(cot_text(random.Random(0), 40))
    assert [len(part.split()) for part in (cot.caption, cot.reasoning, cot.conclusion)] == [10, 20, 10]


def test_the_index_benchs_vectors_are_unit_length_draws_around_the_centres():
    import numpy as np

    from bench.index_scale import clustered, percentiles

    rng = np.random.default_rng(0)
    centres = np.eye(4, 16, dtype=np.float32)
    x = clustered(rng, 300, 16, centres, 0.01)
    assert x.shape == (300, 16) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    assert (x @ centres.T).max(axis=1).min() > 0.9  # each vector lies next to one centre
    assert set((x @ centres.T).argmax(axis=1)) == {0, 1, 2, 3}
    p50, p99 = percentiles([0.001, 0.002, 0.003])
    assert p50 == pytest.approx(2.0) and p99 == pytest.approx(2.98)


def test_the_load_tests_summary_compares_batching_on_and_off():
    from bench.load_service import free_port, summary

    figures = {"p50": 12.4, "p95": 30.0, "p99": 41.6, "n": 100, "failures": 0}
    rows = [("search_no_cot", "on", 8, {**figures, "rps": 50.0}), ("search_no_cot", "off", 8, {**figures, "rps": 20.0}),
            ("embed_image", "on", 1, {**figures, "rps": 9.0})]
    lines = summary(rows).splitlines()
    assert lines[3] == "| search_no_cot | on | 8 | 50.0 | 12 | 30 | 42 | 100 | 0 |"
    assert lines[-1] == "# search_no_cot, 8 clients: batching on / off = 2.50x"  # embed_image ran one way only
    assert len(lines) == 7
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))  # a port it names can be bound


def test_the_mixed_runs_figures_are_per_class_with_latency_of_the_answers_only(capsys):
    from bench.load_service import class_figures, mixed_summary, parser

    calls = ([("/search cot", 200, 3.0)] * 3 + [("/search cot", 503, 0.01)]
             + [("/search no_cot", 200, s) for s in (0.1, 0.2, 0.3, 0.4, 0.5)] + [("/search no_cot", 0, 9.0)])
    figures = class_figures(calls, 10)
    cot, no_cot = figures["/search cot"], figures["/search no_cot"]
    assert (cot["calls"], cot["ok"], cot["unavailable"], cot["other"]) == (4, 3, 1, 0)
    assert cot["answers_s"] == pytest.approx(0.3) and cot["p50"] == pytest.approx(3000.0)   # not the fast 503
    assert (no_cot["calls"], no_cot["ok"], no_cot["unavailable"], no_cot["other"]) == (6, 5, 0, 1)
    assert no_cot["p95"] == pytest.approx(480.0) and no_cot["p99"] == pytest.approx(496.0)
    args = parser().parse_args(["--image", "x.png", "--cot-users", "4", "--nocot-users", "4", "--seconds", "10"])
    lines = mixed_summary(figures, args).splitlines()
    assert lines[1] == "4 CoT + 4 no-CoT clients, 10 s"
    assert lines[4] == "| /search cot | 4 | 3 | 1 | 0 | 75.0 % | 0.30 | 3000 | 3000 | 3000 |"
    assert lines[5] == "| /search no_cot | 6 | 5 | 0 | 1 | 83.3 % | 0.50 | 300 | 480 | 496 |"
    assert "| /search cot | 1 | 0 | 1 | 0 | 0.0 % | 0.00 | - | - | - |" in mixed_summary(
        class_figures([("/search cot", 503, 0.01)], 10), args)
    from bench.load_service import main

    with pytest.raises(SystemExit, match="give --cot-users one count"):
        main(["--image", "x.png", "--cot-users", "1", "8", "--nocot-users", "4"])


def test_the_budget_scripts_options_replace_the_callers():
    from bench.pretrain_budget import _main_args

    assert _main_args(["--init", "base", "--steps", "5"], steps=10, out="o") == [
        "--init", "base", "--steps", "10", "--out", "o"]


def test_the_locust_user_posts_the_search_its_environment_names(tmp_path):
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed: it is in the dev extra (make install, or "
                    ".venv/bin/python tools/lock.py install -e '.[dev]')")
    image = tmp_path / "ref.png"
    image.write_bytes(b"not really a png")
    # in a process of its own: importing locust monkey-patches the standard library (gevent)
    code = """
import bench.locustfile as f
from locust import HttpUser

class Recorder:
    def __init__(self):
        self.posts = []
    def post(self, path, **kw):
        self.posts.append((path, kw))

user = type("U", (), {"client": Recorder()})()
f.Client.call(user)
(path, kw), = user.client.posts
assert issubclass(f.Client, HttpUser) and f.IMAGE == b"not really a png"
print(path, kw["data"], kw["headers"], kw["files"])
# the mixed run's users: their counts from the environment, one mode each
assert (f.CotUser.fixed_count, f.NoCotUser.fixed_count) == (3, 5) and not f.HONOUR_RETRY_AFTER
for cls in (f.CotUser, f.NoCotUser):
    user = type("U", (), {"client": Recorder(), "mode": cls.mode})()
    user.client.post = lambda path, **kw: (user.client.posts.append((path, kw)),
                                           type("R", (), {"status_code": 200, "headers": {}})())[1]
    cls.call(user)
    print(user.client.posts[0][1]["data"]["mode"], user.client.posts[0][1]["name"])
f._record("POST", "/search cot", 1234.5, type("R", (), {"status_code": 503})(), None, start_time=100.0)
f._record("POST", "/search no_cot", 5.0, None, OSError("reset"), start_time=101.0)
f.RECORD.close()
print(open(f.RECORD.name).read(), end="")
"""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": path, "LOAD_IMAGE": str(image), "LOAD_TARGET": "search_cot",
                              "LOAD_TOKEN": "t0k", "LOAD_COT_USERS": "3", "LOAD_NOCOT_USERS": "5",
                              "LOAD_RECORD": str(tmp_path / "calls.tsv")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n") == [
        "/search {'modification': 'make the red shape blue', 'k': '10', 'mode': 'cot'} "
        "{'Authorization': 'Bearer t0k'} {'image': ('ref.png', b'not really a png')}",
        "cot /search cot", "no_cot /search no_cot",
        "/search cot\t503\t1.2345\t100.000", "/search no_cot\t0\t0.0050\t101.000", ""]


def test_the_encoder_bench_reports_each_batch_size_over_the_smallest():
    from bench.encoder_throughput import gains

    assert gains({8: 150.0, 1: 75.0, 32: 120.0}) == {8: 2.0, 1: 1.0, 32: 1.6}
