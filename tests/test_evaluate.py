"""Evaluation (scores per benchmark, reports, submission files), the promotion gate, and the
BentoML model store (promotion, idempotence, rollback)."""

import json
import pathlib
import random
import re
import shutil
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from model_code.backbone import load_backbone
from model_code.benchmarks import benchmark
from model_code.data import Benchmark, read_dataset
from model_code.evaluation.evaluate import Evaluation, Group, evaluate, headline_per_query, score
from model_code.evaluation.gate import GateConfig, gate, paired_bootstrap
from model_code.evaluation.report import markdown_table, submissions, write_report
from model_code.model.cir_cot import CirCoTModel, ModelFolderError, apply_lora
from model_code.registry import lineage
from model_code.synthetic import scenes
from model_code.synthetic.oracle import describe, scene_from_text
from orchestration.__main__ import main
from tests._png import drawn, pixels
from tests.conftest import flip_last_byte

# bentoml: imported where used (slow to import; only the model-store tests need it)


def _group(rows: list[dict], gallery: list[str], name: str = "") -> Group:
    q = pd.DataFrame([{"query_id": str(i), "subset_ids": [], "n_edits": None, "reference_dependent": None, **r}
                      for i, r in enumerate(rows)])
    return Group(name, q, gallery, [])


# ---- scoring per benchmark -------------------------------------------------------------------


def test_cirr_scores_recall_subset_and_the_average_by_hand():
    g = _group([{"reference_id": "r0", "target_ids": ["b"], "subset_ids": ["a", "b", "c"]},
                {"reference_id": "r1", "target_ids": ["z"], "subset_ids": ["c", "z"]}], list("abcz"))
    ranked = {"cot": [["a", "c", "b", "z"], ["z", "a", "b", "c"]]}
    m = score("cirr", [(g, ranked)], ["cot"])["cot"]
    assert (m["R@1"], m["R@5"]) == (0.5, 1.0)
    # subsets: [a, c, b] -> target 3rd; [z, c] -> 1st
    assert (m["R_subset@1"], m["R_subset@2"], m["R_subset@3"]) == (0.5, 0.5, 1.0)
    assert m["Avg"] == (1.0 + 0.5) / 2


def test_fashioniq_averages_recall_over_categories():
    dress = _group([{"reference_id": "r", "target_ids": ["a"]}] * 2, ["a"], "dress")
    shirt = _group([{"reference_id": "r", "target_ids": ["x"]}], ["a"], "shirt")
    ranked_d = {"m": [["a"], ["b"] * 60]}
    ranked_s = {"m": [["x"]]}
    m = score("fashioniq", [(dress, ranked_d), (shirt, ranked_s)], ["m"])["m"]
    assert m["dress/R@10"] == 0.5 and m["shirt/R@10"] == 1.0
    assert m["R@10"] == 0.75 and m["R@50"] == 0.75 and m["Avg"] == 0.75


def test_circo_scores_map_with_several_ground_truths():
    g = _group([{"reference_id": "r", "target_ids": ["a", "c"]}], list("abc"))
    m = score("circo", [(g, {"m": [["a", "b", "c"]]})], ["m"])["m"]
    # AP@5 = (1/1 + 2/3) / min(5, 2)
    assert m["mAP@5"] == pytest.approx((1 + 2 / 3) / 2)


def test_synthetic_breakdown_by_edits_and_reference_dependence():
    rows = [{"reference_id": "r", "target_ids": ["a"], "n_edits": 1, "reference_dependent": True},
            {"reference_id": "r", "target_ids": ["a"], "n_edits": 2, "reference_dependent": False},
            {"reference_id": "r", "target_ids": ["a"], "n_edits": 2, "reference_dependent": True}]
    g = _group(rows, ["a", "b"])
    m = score("synthetic", [(g, {"m": [["a", "b"], ["b", "a"], ["a", "b"]]})], ["m"])["m"]
    assert m["R@1"] == pytest.approx(2 / 3)
    assert m["R@1[edits=1]"] == 1.0 and m["R@1[edits=2]"] == 0.5 and m["n[edits=2]"] == 2
    assert m["R@1[ref_dependent]"] == 1.0 and m["R@1[ref_independent]"] == 0.0


def test_a_conclusion_is_read_back_into_the_objects_it_states():
    rng = random.Random(3)
    for _ in range(50):
        scene = scenes.random_scene(rng, iter(range(100)).__next__)
        truth = {scenes.scene_key((o,))[0] for o in scene}
        assert scene_from_text(describe(scene)) == truth
    assert scene_from_text("a big Red circle in the upper left corner, then nonsense") == {
        ("circle", "red", "large", 0, 0)
    }
    assert scene_from_text("<caption>garbage</caption>") == set()


# ---- the whole evaluation on the tiny benchmark -------------------------------------------------


@pytest.fixture(scope="module")
def micro_model(micro_base):
    torch.manual_seed(0)
    model, processor = load_backbone(micro_base, device="cpu")
    m = CirCoTModel(apply_lora(model, processor, r=4, alpha=8), processor, base_path=str(micro_base))
    m.version = "micro-test"
    return m


def test_evaluation_scores_every_method_writes_the_report_and_resumes_from_its_cache(micro_model, tiny_synthetic,
                                                                                     tmp_path, monkeypatch):
    bench = read_dataset("synthetic", tiny_synthetic)
    cache = tmp_path / "cache"
    ev = evaluate(micro_model, bench, tiny_synthetic, "synthetic", "test", batch_size=8, max_new_tokens=6,
                  cache_dir=cache, say=lambda s: None)
    test = bench.triplets[bench.triplets.split == "test"]
    assert set(ev.metrics) == {"cot", "no_cot", "image_only", "text_only"} and not ev.hidden
    gallery = set(bench.images[bench.images.split == "test"].image_id)
    assert len(gallery) < 50
    for method, m in ev.metrics.items():
        ranked = ev.rankings[method]
        for q in test.itertuples():  # under 50 images, the top 50 is the whole gallery but the reference
            assert sorted(ranked[q.query_id]) == sorted(gallery - {q.reference_id}), method
        for k in (1, 5, 10, 50):  # recall by hand: the share of queries with a target among their first k
            hits = [bool(set(q.target_ids) & set(ranked[q.query_id][:k])) for q in test.itertuples()]
            assert m[f"R@{k}"] == pytest.approx(sum(hits) / len(hits)), (method, k)
    # the reference is excluded from its own ranking (CIRR's rule, which cir-shapes follows)
    for q in test.itertuples():
        assert q.reference_id not in ev.rankings["no_cot"][q.query_id]
    assert {"R@1[edits=1]", "R@1[ref_dependent]"} <= set(ev.metrics["cot"])
    # the micro model's 6-token chains hold no three sections: none parses, none states the target (the
    # reasoning metrics on known chains: test_reasoning_metrics_score_known_chains)
    assert all(r["cot"] is None and r["error"] for r in ev.reasoning.values())
    assert [ev.metrics["cot"][k] for k in ("cot_parsed", "conclusion_exact", "conclusion_object_f1")] == [0.0] * 3
    assert set(ev.reasoning) == set(test.query_id) and all("text" in r for r in ev.reasoning.values())
    assert ev.timings["cot"]["n"] == len(test) and ev.timings["gallery"]["per_s"] > 0
    for method, scores in ev.per_query.items():  # what the gate's paired test reads: the headline, query by query
        assert sum(scores.values()) / len(scores) == pytest.approx(ev.metrics[method]["R@10"])

    images = {i: tiny_synthetic / p for i, p in zip(bench.images.image_id, bench.images.path)}
    written = write_report(ev, tmp_path / "report", images)
    assert json.loads(written["metrics.json"].read_text()) == json.loads(json.dumps(ev.metrics))
    table = written["table.md"].read_text()
    assert all(f"| {m} |" in table for m in ev.metrics) and "queries/s" in table
    recall = pixels(written["recall.png"])
    assert recall.shape == (324, 495, 3)  # 5.5 x 3.6 in at 90 dpi
    colours = [f"C{i}" for i in range(len(ev.metrics) + 1)]  # one line (and legend entry) per method, no more
    assert [drawn(recall, c) > 20 for c in colours] == [True] * len(ev.metrics) + [False]
    grid = pixels(written["qualitative.png"])
    assert grid.shape == (832, 1280, 3)  # 4 queries, a row of 16 x 2.6 in each at 80 dpi
    assert drawn(grid, scenes.BACKGROUND) > 24 * 1000  # the reference and 5 results of each row are shown
    framed = any(set(q.target_ids) & set(ev.rankings["cot"][q.query_id][:5]) for q in test.iloc[:4].itertuples())
    assert (drawn(grid, "green") > 500) == framed  # a target among a row's results is framed in green
    lines = [json.loads(x) for x in written["queries.jsonl"].read_text().splitlines()]
    assert len(lines) == len(test) and "reasoning" in lines[0] and len(lines[0]["top10"]["cot"]) == 10

    # a second evaluation of the same model version reads its embeddings from the cache
    def boom(*a, **k):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(micro_model, "infer_queries", boom)
    monkeypatch.setattr(micro_model, "embed_images", boom)
    again = evaluate(micro_model, bench, tiny_synthetic, "synthetic", "test", batch_size=8, max_new_tokens=6,
                     cache_dir=cache, say=lambda s: None)
    assert again.metrics == ev.metrics


class KnownChains:
    """The micro model, its ``cot`` queries answered with given chains (in query order) instead of
    generated ones: the embeddings are the model's, the reasoning is known."""

    version = None   # not cached

    def __init__(self, model, chains: list[str]):
        self.model, self.chains = model, list(chains)

    def embed_images(self, images, batch_size=32):
        return self.model.embed_images(images, batch_size=batch_size)

    def infer_queries(self, images, texts, mode="cot", *, max_new_tokens=256, batch_size=16):
        from model_code.chain import CoTFormatError, parse

        emb, _ = self.model.infer_queries(images, texts, "no_cot", batch_size=batch_size)
        reasoning = []
        for text in self.chains[:len(texts)]:
            try:
                reasoning.append({"text": text, "ids": [], "cot": parse(text), "error": None})
            except CoTFormatError as e:
                reasoning.append({"text": text, "ids": [], "cot": None, "error": str(e)})
        del self.chains[:len(texts)]
        return emb, reasoning


def test_reasoning_metrics_score_known_chains(micro_model, tiny_synthetic):
    """cot_parsed, conclusion_exact and conclusion_object_f1 on chains whose worth is known: the
    oracle's (the target exactly), one concluding with the reference (stale), one stating a single
    target object, and text that does not parse, in turn over the test split's queries."""
    from model_code.chain import CoT
    from model_code.synthetic.oracle import oracle_cot

    bench = read_dataset("synthetic", tiny_synthetic)
    test = bench.triplets[bench.triplets.split == "test"].reset_index(drop=True)
    graphs = json.loads((tiny_synthetic / "scene_graphs" / "test.json").read_text())
    edits = {q["query_id"]: q["edits"] for q in json.loads((tiny_synthetic / "captions" / "cap.test.json").read_text())}
    chains, exact, f1 = [], [], []
    for i, q in enumerate(test.itertuples()):
        reference = scenes.scene_from_json(graphs[q.reference_id])
        target = scenes.scene_from_json(graphs[q.target_ids[0]])
        truth = {scenes.scene_key((o,))[0] for o in target}
        kind = ("oracle", "stale", "one object", "unparsed")[i % 4]
        if kind == "oracle":
            chains.append(oracle_cot(q.query_id, reference, edits[q.query_id]).render())
            exact.append(1)
            f1.append(1.0)
        elif kind == "stale":
            chains.append(CoT(describe(reference), "nothing changes", describe(reference)).render())
            stated = {scenes.scene_key((o,))[0] for o in reference}
            assert stated != truth
            exact.append(0)
            f1.append(2 * len(stated & truth) / (len(stated) + len(truth)))
        elif kind == "one object":
            chains.append(CoT(describe(reference), "keep one", describe(scenes.make_scene(target[:1]))).render())
            exact.append(int(len(truth) == 1))
            f1.append(2 / (1 + len(truth)))
        else:
            chains.append("I think it is the blue one.")
            exact.append(0)
            f1.append(0.0)
    ev = evaluate(KnownChains(micro_model, chains), bench, tiny_synthetic, "synthetic", "test", methods=["cot"],
                  batch_size=5, say=lambda s: None)
    m = ev.metrics["cot"]
    n = len(test)
    assert m["cot_parsed"] == pytest.approx(sum(1 for i in range(n) if i % 4 != 3) / n)
    assert m["conclusion_exact"] == pytest.approx(sum(exact) / n)
    assert m["conclusion_object_f1"] == pytest.approx(sum(f1) / n)
    assert 0 < m["conclusion_exact"] < m["conclusion_object_f1"] < m["cot_parsed"] < 1


def test_bad_input_gives_a_clear_error(micro_model, tiny_synthetic):
    bench = read_dataset("synthetic", tiny_synthetic)
    with pytest.raises(ValueError, match="no queries"):
        evaluate(micro_model, bench, tiny_synthetic, "synthetic", "nosuchsplit")
    with pytest.raises(ValueError, match="unknown method"):
        evaluate(micro_model, bench, tiny_synthetic, "synthetic", "test", methods=["clip"], say=lambda s: None)


# ---- submission files ---------------------------------------------------------------------------


def _hidden(dataset: str, split: str, queries: pd.DataFrame, ranking: list[str], subset=None) -> Evaluation:
    ranks = {"cot": {q: ranking for q in queries.query_id}}
    return Evaluation(benchmark(dataset), split, "v", True, {}, ranks, {}, {}, queries,
                      {"cot": {q: subset for q in queries.query_id}} if subset is not None else {})


def test_cirr_submission_files_follow_the_server_format():
    q = pd.DataFrame({"query_id": ["101", "102"], "reference_id": ["r", "r"], "modification": ["x", "y"],
                      "target_ids": [[], []], "subset_ids": [["a", "b", "r"], ["c"]]})
    files = submissions(_hidden("cirr", "test1", q, [f"img{i}" for i in range(80)], ["b", "a"]), "cot")
    recall, subset = files["cirr_test1_cot_recall.json"], files["cirr_test1_cot_recall_subset.json"]
    assert (recall["version"], recall["metric"]) == ("rc2", "recall")
    assert (subset["version"], subset["metric"]) == ("rc2", "recall_subset")
    assert set(recall) - {"version", "metric"} == {"101", "102"} and len(recall["101"]) == 50
    assert subset["101"] == ["b", "a"]


def test_circo_submission_maps_query_ids_back_to_the_annotation_ids():
    q = pd.DataFrame({"query_id": ["test-0", "test-17"], "reference_id": ["1", "2"], "modification": ["x", "y"],
                      "target_ids": [[], []]})
    (name, content), = submissions(_hidden("circo", "test", q, [str(i) for i in range(70)]), "cot").items()
    assert name == "circo_test_cot.json" and set(content) == {"0", "17"} and len(content["17"]) == 50


def test_the_evaluation_of_a_cirr_split_gives_subset_rankings_from_the_full_order(micro_model, tmp_path):
    """The subset's top 3 come from the whole ranking, not from the top 50."""
    root = tmp_path / "cirr"
    (root / "img").mkdir(parents=True)
    ids = [f"i{k}" for k in range(60)]
    for k, i in enumerate(ids):
        Image.new("RGB", (32, 32), (k * 4, 255 - k * 4, 40)).save(root / "img" / f"{i}.png")
    images = pd.DataFrame({"image_id": ids, "dataset": "cirr", "split": "test1", "path": [f"img/{i}.png" for i in ids],
                           "category": None})
    triplets = pd.DataFrame(
        [
            {
                "query_id": "7",
                "dataset": "cirr",
                "split": "test1",
                "category": None,
                "reference_id": "i0",
                "modification": "more red",
                "target_ids": [],
                "subset_ids": ["i0", "i5", "i9", "i33"],
                "shared_concept": None,
            }
        ]
    )
    ev = evaluate(micro_model, Benchmark(triplets, images), root, "cirr", "test1", methods=["no_cot"],
                  say=lambda s: None)
    assert ev.hidden and ev.metrics == {}
    assert markdown_table(ev).startswith("cirr/test1: targets are hidden")
    full = ev.subset_rankings["no_cot"]["7"]
    assert sorted(full) == sorted(["i5", "i9", "i33"])  # the reference is never in its own subset ranking
    written = write_report(ev, tmp_path / "out")
    assert json.loads(written["cirr_test1_no_cot_recall_subset.json"].read_text())["7"] == full


def test_fashioniq_is_evaluated_per_category_against_its_own_gallery(micro_model, tmp_path):
    root = tmp_path / "fiq"
    (root / "images").mkdir(parents=True)
    rows, images = [], []
    for c, category in enumerate(("dress", "shirt")):
        ids = [f"{category}{k}" for k in range(6)]
        for k, i in enumerate(ids):
            Image.new("RGB", (32, 32), (40 * k, 100 * c, 200 - 30 * k)).save(root / "images" / f"{i}.png")
            images.append({"image_id": i, "dataset": "fashioniq", "split": "val", "path": f"images/{i}.png",
                           "category": category})
        rows += [{"query_id": f"{category}-val-{q}", "dataset": "fashioniq", "split": "val", "category": category,
                  "reference_id": ids[q], "modification": "is darker and longer", "target_ids": [ids[q + 1]],
                  "subset_ids": [], "shared_concept": None} for q in range(3)]
    bench = Benchmark(pd.DataFrame(rows), pd.DataFrame(images))
    ev = evaluate(micro_model, bench, root, "fashioniq", "val", methods=["no_cot", "image_only"], say=lambda s: None)
    m = ev.metrics["no_cot"]
    # each category's gallery holds its 6 images only: every target is within the top 10
    assert m["dress/R@10"] == m["shirt/R@10"] == m["R@10"] == m["Avg"] == 1.0
    for q in ev.queries.itertuples():
        assert all(i.startswith(q.category) for i in ev.rankings["no_cot"][q.query_id])
    assert ev.timings["gallery"]["n"] == 12
    # the paired test reads the same statistic as the headline: queries grouped by category
    assert ev.strata == {q.query_id: q.category for q in ev.queries.itertuples()}


def test_a_changed_gallery_is_embedded_again_and_an_unsaved_model_is_not_cached(micro_model, synthetic_copy, tmp_path):
    """Regression test: the cache was keyed by model version and split only, so a changed gallery
    of the same length reused the old embeddings, and every unsaved model shared one cache."""
    bench = read_dataset("synthetic", synthetic_copy)
    cache = tmp_path / "cache"
    kwargs = {"methods": ["image_only", "no_cot"], "batch_size": 8, "cache_dir": cache, "say": lambda s: None}
    first = evaluate(micro_model, bench, synthetic_copy, "synthetic", "test", **kwargs)
    test_images = bench.images[bench.images.split == "test"]
    a, b = (synthetic_copy / p for p in test_images.path.iloc[:2])
    shutil.copy(b, a)  # the gallery's first image now shows another scene: same ids, same count
    calls = []
    original = micro_model.embed_images

    def counting(images, **k):
        calls.append(len(images))
        return original(images, **k)

    micro_model.embed_images = counting
    try:
        second = evaluate(micro_model, bench, synthetic_copy, "synthetic", "test", **kwargs)
    finally:
        del micro_model.embed_images
    assert sum(calls) == len(test_images)  # embedded again, not read from the stale cache
    # the two images now look alike: every ranking holding both holds them side by side
    a_id, b_id = test_images.image_id.iloc[:2]
    for method in ("image_only", "no_cot"):
        pairs = [(r.index(a_id), r.index(b_id)) for r in second.rankings[method].values() if {a_id, b_id} <= set(r)]
        assert pairs and all(abs(i - j) == 1 for i, j in pairs), (method, pairs)
        assert second.rankings[method] != first.rankings[method]
    # a model without a version (never saved) writes no cache at all
    version, micro_model.version = micro_model.version, None
    try:
        evaluate(micro_model, bench, synthetic_copy, "synthetic", "test", **{**kwargs, "cache_dir": tmp_path / "c2"})
    finally:
        micro_model.version = version
    assert not any((tmp_path / "c2").rglob("*.pt"))


# ---- the gate -----------------------------------------------------------------------------------


METRICS = {"cot": {"R@1": 0.4, "R@10": 0.8}, "no_cot": {"R@1": 0.35, "R@10": 0.75}}


def test_gate_passes_and_explains_itself():
    v = gate(METRICS, "R@10", GateConfig(floors={"R@10": 0.5}), {"version": "old", "metrics": {"R@10": 0.805}})
    assert v.passed and v.value == 0.8
    assert [c.name for c in v.checks] == ["floor R@10", "cot not worse than no_cot", "no regression"]
    assert "0.8000 vs production old 0.8050" in v.explain()


@pytest.mark.parametrize("config, production, failing", [
    (GateConfig(floors={"R@10": 0.9}), None, "floor R@10"),
    (GateConfig(floors={"R@50": 0.1}), None, "floor R@50"),          # a floor on a metric never measured
    (GateConfig(), {"version": "old", "metrics": {"R@10": 0.85}}, "no regression"),
])
def test_gate_fails_on_a_floor_or_a_regression(config, production, failing):
    v = gate(METRICS, "R@10", config, production)
    assert not v.passed and [c.name for c in v.checks if not c.passed] == [failing]


def test_gate_requires_cot_not_worse_than_no_cot_unless_switched_off():
    worse = {"cot": {"R@10": 0.70}, "no_cot": {"R@10": 0.75}}
    assert not gate(worse, "R@10", GateConfig()).passed
    assert gate(worse, "R@10", GateConfig(cot_tolerance=0.06)).passed
    assert gate(worse, "R@10", GateConfig(cot_not_worse=False)).passed


def _per_query(cot_hits: int, no_cot_hits: int, n: int = 400) -> tuple[dict, dict]:
    per_query = {"cot": {f"q{i}": float(i < cot_hits) for i in range(n)},
                 "no_cot": {f"q{i}": float(i < no_cot_hits) for i in range(n)}}
    metrics = {m: {"R@10": sum(v.values()) / n} for m, v in per_query.items()}
    return metrics, per_query


def test_paired_test_by_category_reads_the_headline_statistic():
    """FashionIQ's headline averages its categories: the paired test does too (regression test: it
    pooled every query, so the larger category outweighed the smaller)."""
    a = [1.0] * 10 + [0.0] * 90          # cot: every query of the small category right
    b = [0.0] * 100                      # no_cot: none
    strata = ["shirt"] * 10 + ["dress"] * 90
    pooled, _, _ = paired_bootstrap(a, b)
    by_category, low, high = paired_bootstrap(a, b, strata=strata)
    assert pooled == pytest.approx(0.1) and by_category == pytest.approx(0.5) and low == high == pytest.approx(0.5)
    cot = {"cot": {"Avg": 0.5}, "no_cot": {"Avg": 0.0}}
    ids = [str(i) for i in range(100)]
    per_query = {"cot": dict(zip(ids, a)), "no_cot": dict(zip(ids, b))}
    v = gate(cot, "Avg", GateConfig(), per_query=per_query, strata=dict(zip(ids, strata)))
    assert v.passed and "difference +0.5000" in v.checks[0].detail


def test_gate_compares_cot_with_no_cot_query_by_query():
    # 2 queries out of 400 apart: noise, not a worse model
    metrics, per_query = _per_query(198, 200)
    v = gate(metrics, "R@10", GateConfig(), per_query=per_query)
    assert v.passed and "not significantly worse" in v.checks[0].detail
    # 40 queries apart, the same 160 hits shared: CoT is worse, and the paired test says so
    metrics, per_query = _per_query(160, 200)
    v = gate(metrics, "R@10", GateConfig(), per_query=per_query)
    assert not v.passed and "significantly worse" in v.checks[0].detail
    # without per-query scores (or with the test off) the means decide
    assert not gate(*_per_query(198, 200)[:1], "R@10", GateConfig()).passed
    assert not gate(metrics, "R@10", GateConfig(cot_confidence=None), per_query=per_query).passed
    # the per-query scores average to the headline: evaluation's headline_per_query
    g = _group([{"reference_id": "r", "target_ids": ["a"]}, {"reference_id": "r", "target_ids": ["z"]}], ["a"])
    assert headline_per_query("synthetic", [(g, {"m": [["a"], ["a"]]})], "m") == {"0": 1.0, "1": 0.0}


# ---- the BentoML model store ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_models(micro_model, tmp_path_factory):
    """Two saved models with different adapters (A and B)."""
    out = {}
    for name, seed in (("A", 1), ("B", 2)):
        with torch.no_grad():
            for n, p in micro_model.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.01)
        path = tmp_path_factory.mktemp(name) / "model"
        out[name] = (path, micro_model.save(path))
    return out


def _stages(store, dataset="synthetic"):
    return {m["version"]: m["stages"].get(dataset) for m in store.list_models()}


def test_promotion_is_idempotent_archives_the_previous_model_and_rolls_back(store, saved_models, tiny_synthetic):
    (path_a, ver_a), (path_b, ver_b) = saved_models["A"], saved_models["B"]
    assert ver_a != ver_b and store.production("synthetic") is None
    labels = {"model_version": "x", "headline_synthetic": "R@10=0.5"}
    first = store.promote(path_a, version=ver_a, dataset="synthetic", labels=labels,
                          metadata={"evaluations": {"synthetic/test": {"R@10": 0.5}}})
    assert first["changed"] and first["previous"] is None
    assert store.production("synthetic")["tag"] == f"cir-cot:{ver_a}"
    assert store.production_metrics("synthetic", "test") == {"version": ver_a, "metrics": {"R@10": 0.5}}
    again = store.promote(path_a, version=ver_a, dataset="synthetic", labels=labels)
    assert not again["changed"] and len(store.list_models()) == 1

    second = store.promote(path_b, version=ver_b, dataset="synthetic", labels=labels)
    assert second["changed"] and second["previous"] == f"cir-cot:{ver_a}"
    assert _stages(store) == {ver_a: "archived", ver_b: "production"}

    # the stored entry is self-contained: it loads (with its copied base) and embeds like the original
    image = next((tiny_synthetic / "images" / "test").glob("*.png"))
    stored = store.load_promoted(dataset="synthetic", device="cpu")
    assert stored.version == ver_b
    torch.testing.assert_close(
        stored.embed_images([image]), CirCoTModel.load(path_b, device="cpu").embed_images([image])
    )

    moved = store.rollback("synthetic")
    assert moved == {"from": f"cir-cot:{ver_b}", "to": f"cir-cot:{ver_a}"}
    assert _stages(store) == {ver_a: "production", ver_b: "rolled_back"}
    # the pipeline promoting the rolled-back model again does not undo the operator's rollback...
    refused = store.promote(path_b, version=ver_b, dataset="synthetic", labels=labels)
    assert not refused["changed"] and "rolled back" in refused["reason"]
    assert store.production("synthetic")["version"] == ver_a
    # ...unless forced
    assert store.promote(path_b, version=ver_b, dataset="synthetic", labels=labels, force=True)["changed"]
    assert store.production("synthetic")["version"] == ver_b
    with pytest.raises(FileNotFoundError):
        store.promote(path_a.parent, version="nope", dataset="synthetic", labels=labels)


def test_the_store_verifies_content_and_a_damaged_entry_is_reported_and_repaired(store, saved_models, tmp_path):
    (path_a, ver_a), (path_b, ver_b) = saved_models["A"], saved_models["B"]
    labels = {"model_version": "x"}
    # a folder whose weights were truncated after saving is refused before any label changes
    bad = tmp_path / "bad"
    shutil.copytree(path_a, bad)
    weights = next((bad / "adapter").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelFolderError, match=r"damaged: adapter/adapter_model\.safetensors has 100 bytes"):
        store.promote(bad, version=ver_a, dataset="synthetic", labels=labels)
    assert store.production("synthetic") is None
    # another model's version for a folder is refused too
    with pytest.raises(ValueError, match=f"is version {ver_a}, not {ver_b}"):
        store.promote(path_a, version=ver_b, dataset="synthetic", labels=labels)
    store.promote(path_a, version=ver_a, dataset="synthetic", labels=labels)
    store.promote(path_b, version=ver_b, dataset="synthetic", labels=labels)
    # the production entry damaged in the store: listed as such, its load says so, rollback to it refused...
    stored = pathlib.Path(store.production("synthetic")["path"]) / "model" / "adapter" / "adapter_model.safetensors"
    good = stored.read_bytes()
    stored.write_bytes(good[:-10])
    row = next(r for r in store.list_models() if r["version"] == ver_b)
    assert row["health"].startswith("damaged: ") and "adapter_model.safetensors" in row["health"]
    with pytest.raises(ModelFolderError, match="damaged"):
        store.load_promoted(dataset="synthetic", device="cpu")
    # ...and promoting a good copy again repairs it
    again = store.promote(path_b, version=ver_b, dataset="synthetic", labels=labels)
    assert again["changed"] and "is restored from" in again["reason"]
    assert stored.read_bytes() == good and all(r["health"] == "ok" for r in store.list_models())
    assert store.load_promoted(dataset="synthetic", device="cpu").version == ver_b
    # an archived entry damaged is not rolled back to
    archived = pathlib.Path(next(r for r in store.list_models() if r["version"] == ver_a)["path"]) / "model"
    other = next(p for p in archived.rglob("*.json") if p.name != "circot.json")
    other.write_text(other.read_text() + " ")
    with pytest.raises(LookupError, match="cannot roll synthetic back"):
        store.rollback("synthetic")


def test_models_verify_checks_content_and_finds_a_bit_flip_the_size_check_cannot(store, saved_models, capsys):
    """Weights damaged without a size change: the fast listing (sizes) cannot see it, ``models --verify``
    (every file's md5, the version recomputed from the weights) reports it DAMAGED with a non-zero exit,
    the load for the gallery index (``load_promoted``) refuses it naming the file, and a stored
    circot.json whose version was edited is reported too."""
    (path_a, ver_a), (path_b, ver_b) = saved_models["A"], saved_models["B"]
    store.promote(path_a, version=ver_a, dataset="synthetic", labels={})
    store.promote(path_b, version=ver_b, dataset="synthetic", labels={})
    capsys.readouterr()
    assert main(["models", "--verify"]) == 0
    out = capsys.readouterr().out
    for version in (ver_a, ver_b):
        assert re.search(rf"cir-cot:{version} +OK: every file's md5 and the version .* \(\d+\.\d\d s\)", out), out
    assert "DAMAGED" not in out

    stored = pathlib.Path(store.production("synthetic")["path"]) / "model" / "adapter" / "adapter_model.safetensors"
    size = stored.stat().st_size
    flip_last_byte(stored)
    assert stored.stat().st_size == size
    assert main(["models"]) == 0 and "DAMAGED" not in capsys.readouterr().out    # sizes only: fast, blind to it
    assert main(["models", "--verify"]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"cir-cot:{ver_b} +DAMAGED: .*adapter/adapter_model\.safetensors differs from what was saved "
                     r"\(md5\)", out), out
    assert re.search(rf"cir-cot:{ver_a} +OK: ", out), out
    # the gallery index's load (the gallery_index asset, index_recall) refuses it, naming the file
    with pytest.raises(ModelFolderError, match=r"damaged: adapter/adapter_model\.safetensors differs .*\(md5\)"):
        store.load_promoted(dataset="synthetic", device="cpu")
    flip_last_byte(stored)   # back as it was
    assert main(["models", "--verify"]) == 0
    # the base model copied into the entry is loaded too: its weights are checked against the version saved
    base = next((stored.parents[2] / "base").glob("*.safetensors"))
    flip_last_byte(base)
    capsys.readouterr()
    assert main(["models", "--verify"]) == 1
    assert re.search(rf"cir-cot:{ver_b} +DAMAGED: .*its base model .*/base has version \w+, \w+ when the model was "
                     "saved", capsys.readouterr().out)
    flip_last_byte(base)

    # an entry whose circot.json states another version than its weights': found by --verify
    described = pathlib.Path(next(r for r in store.list_models() if r["version"] == ver_a)["path"]) / "model"
    meta = json.loads((described / "circot.json").read_text())
    (described / "circot.json").write_text(json.dumps({**meta, "version": ver_b}))
    capsys.readouterr()
    assert main(["models", "--verify"]) == 1
    assert re.search(rf"cir-cot:{ver_a} +DAMAGED: .*its version recomputed from its weights is {ver_a}, circot.json "
                     rf"says {ver_b}", capsys.readouterr().out)


def test_promotion_recomputes_the_version_from_the_weights(store, saved_models, tmp_path):
    """A circot.json whose version was edited would store one model's weights under another's tag:
    promotion recomputes the version from the weights and refuses it, whichever version the record
    names, before any label changes."""
    (path_a, ver_a), (_, ver_b) = saved_models["A"], saved_models["B"]
    edited = tmp_path / "edited"
    shutil.copytree(path_a, edited)
    meta = json.loads((edited / "circot.json").read_text())
    (edited / "circot.json").write_text(json.dumps({**meta, "version": ver_b}))
    for version in (ver_b, ver_a):
        with pytest.raises(ModelFolderError, match=f"its version recomputed from its weights is {ver_a}, "
                                                   f"circot.json says {ver_b}"):
            store.promote(edited, version=version, dataset="synthetic", labels={})
    assert store.list_models() == [] and store.production("synthetic") is None
    # weights put in beside the saved ones change the version too
    extra = tmp_path / "extra"
    shutil.copytree(path_a, extra)
    shutil.copy(extra / "adapter" / "adapter_model.safetensors", extra / "adapter" / "more.safetensors")
    with pytest.raises(ModelFolderError, match="its version recomputed from its weights is"):
        store.promote(extra, version=ver_a, dataset="synthetic", labels={})
    # the untouched folder promotes under its own version
    assert store.promote(path_a, version=ver_a, dataset="synthetic", labels={})["tag"] == f"cir-cot:{ver_a}"


def test_production_is_per_dataset(store, saved_models):
    """Promoting on a second dataset leaves the first dataset's production model alone, and each
    dataset's regression baseline is its own production model (regression test: one production
    slot for all datasets archived synthetic's model when CIRR promoted another)."""
    (path_a, ver_a), (path_b, ver_b) = saved_models["A"], saved_models["B"]
    store.promote(path_a, version=ver_a, dataset="synthetic", labels={},
                  metadata={"evaluations": {"synthetic/test": {"R@10": 0.9}}})
    store.promote(
        path_b, version=ver_b, dataset="cirr", labels={}, metadata={"evaluations": {"cirr/val": {"Avg": 0.3}}}
    )
    assert store.production("synthetic")["version"] == ver_a and store.production("cirr")["version"] == ver_b
    assert _stages(store, "synthetic") == {ver_a: "production", ver_b: None}
    assert store.production_metrics("synthetic", "test") == {"version": ver_a, "metrics": {"R@10": 0.9}}
    assert store.production_metrics("cirr", "val") == {"version": ver_b, "metrics": {"Avg": 0.3}}
    assert store.production("fashioniq") is None and store.production_metrics("fashioniq", "val") is None
    # the same model promoted on a second dataset: one entry, production on both, both evaluations kept
    store.promote(
        path_a, version=ver_a, dataset="cirr", labels={}, metadata={"evaluations": {"cirr/val": {"Avg": 0.4}}}
    )
    assert len(store.list_models()) == 2 and store.production("cirr")["version"] == ver_a
    assert _stages(store, "cirr") == {ver_a: "production", ver_b: "archived"}
    assert store.production_metrics("synthetic", "test")["metrics"] == {"R@10": 0.9}
    assert store.production_metrics("cirr", "val")["metrics"] == {"Avg": 0.4}
    # rolling back CIRR does not touch synthetic
    store.rollback("cirr")
    assert store.production("cirr")["version"] == ver_b and store.production("synthetic")["version"] == ver_a


def test_saving_a_loaded_model_again_keeps_its_version_and_files(store, saved_models, tmp_path):
    """The version depends on content only (regression test: it hashed the base model's absolute
    path, and a model loaded from the store saved again pointed at a relative '../base')."""
    path_a, ver_a = saved_models["A"]
    again = CirCoTModel.load(path_a, device="cpu")
    assert again.save(tmp_path / "again") == ver_a
    for f in sorted((path_a / "adapter").rglob("*")):
        if f.is_file():
            assert (tmp_path / "again" / "adapter" / f.relative_to(path_a / "adapter")).read_bytes() == f.read_bytes()
    # from the store (base copied beside it, referenced as ../base): same version, and the saved
    # copy points at a base model that exists
    store.promote(path_a, version=ver_a, dataset="synthetic", labels={})
    stored = store.load_promoted(dataset="synthetic", device="cpu")
    assert stored.save(tmp_path / "from-store") == ver_a
    meta = json.loads((tmp_path / "from-store" / "circot.json").read_text())
    assert (pathlib.Path(meta["base_model"]) / "config.json").is_file()
    assert CirCoTModel.load(tmp_path / "from-store", device="cpu").version == ver_a
    # the same weights under another path: the same version
    moved_base = tmp_path / "elsewhere" / "base"
    shutil.copytree(json.loads((path_a / "circot.json").read_text())["base_model"], moved_base)
    meta = json.loads((path_a / "circot.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(path_a, copy)
    (copy / "circot.json").write_text(json.dumps({**meta, "base_model": str(moved_base)}))
    assert CirCoTModel.load(copy, device="cpu").save(tmp_path / "copy-saved") == ver_a


def test_rollback_without_a_previous_model_says_so(store, capsys):
    with pytest.raises(LookupError, match="no archived"):
        store.rollback("synthetic")
    assert main(["rollback"]) == 1 and "no archived cir-cot model" in capsys.readouterr().out
    assert main(["models"]) == 0 and "no cir-cot model" in capsys.readouterr().out


def test_the_command_line_lists_models_and_rolls_back(store, saved_models, capsys):
    (path_a, ver_a), (path_b, ver_b) = saved_models["A"], saved_models["B"]
    labels = {"evaluated_on_synthetic": "synthetic/test"}
    store.promote(path_a, version=ver_a, dataset="synthetic", labels={**labels, "headline_synthetic": "R@10=0.4"})
    store.promote(path_b, version=ver_b, dataset="synthetic", labels={**labels, "headline_synthetic": "R@10=0.5"})
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines.pop(0).startswith("BentoML model store: ")  # says where it looked
    assert lines[0].split()[:3] == [f"cir-cot:{ver_b}", "synthetic", "production"] and "R@10=0.5" in lines[0]
    assert lines[1].split()[:3] == [f"cir-cot:{ver_a}", "synthetic", "archived"]
    assert main(["rollback", "--dataset", "synthetic", "--store-only"]) == 0
    out = capsys.readouterr().out
    assert f"production of synthetic is now cir-cot:{ver_a}" in out and "not delivered (--store-only)" in out


def test_rollback_delivers_the_previous_model_as_a_promotion_does(store, saved_models, tmp_path, capsys):
    """`circot rollback`: the store's production model changes, then the deliver job builds its Bento,
    exports it and writes manifests naming its image (what a promotion delivers)."""
    import dagster as dg

    from assets.deployment import validate
    from orchestration.__main__ import rollback
    from orchestration.definitions import build_definitions

    (path_a, ver_a), (path_b, ver_b) = saved_models["A"], saved_models["B"]
    store.promote(path_a, version=ver_a, dataset="synthetic", labels={})
    store.promote(path_b, version=ver_b, dataset="synthetic", labels={})
    defs = build_definitions(project_dir=str(tmp_path), artifacts_root=str(tmp_path / "artifacts"), dataset_roots={})
    assert rollback("synthetic", definitions=defs, dagster_instance=dg.DagsterInstance.ephemeral()) == 0, \
        capsys.readouterr().out
    out = capsys.readouterr().out
    assert "== deliver [synthetic]: succeeded" in out and "asset deployment" in out
    folder = tmp_path / "artifacts" / "deployments" / "synthetic" / f"synthetic-{ver_a}"
    record = json.loads((folder / "delivery.json").read_text())
    assert record["bento"] == f"circot:synthetic-{ver_a}" and record["model"] == f"cir-cot:{ver_a}"
    assert pathlib.Path(record["export"]).stat().st_size == record["export_bytes"] > 0 and record["applied"] == []
    manifests = list(yaml.safe_load_all((folder / "manifests.yaml").read_text()))
    assert manifests[-1]["spec"]["template"]["spec"]["containers"][0]["image"] == f"circot:synthetic-{ver_a}"
    assert validate(manifests, "1.31") == []
    assert not (tmp_path / "artifacts" / "deployments" / "synthetic" / f"synthetic-{ver_b}").exists()


def test_lineage_labels_name_the_model_its_data_and_its_headline():
    trained = SimpleNamespace(version="m1", base_version="b1", stages={"cot": {}}, dataset="cirr",
                              data={"cirr": {"raw": "d1", "annotations": "a1", "teacher": "file:cirr.jsonl",
                                             "prompt_version": "chains-1"}})
    evaluation = SimpleNamespace(dataset="cirr", split="val", headline="Avg", zero_shot_from=None,
                                 metrics={"cot": {"R@1": 0.25, "Avg": 0.5, "R@5": 0.75}, "no_cot": {"Avg": 0.4}})
    labels, metadata = lineage(trained, evaluation, {"passed": True})
    assert labels == {"model_version": "m1", "base_version": "b1", "evaluated_on_cirr": "cirr/val",
                      "headline_cirr": "Avg=0.5000", "cot_R@1_cirr": "0.2500", "cot_Avg_cirr": "0.5000",
                      "trained_on": "cirr", "data_cirr": "d1", "annotations_cirr": "a1",
                      "teacher_cirr": "file:cirr.jsonl/chains-1"}
    # the same model evaluated on CIRCO, which has no train split: zero-shot, and labelled so
    circo = SimpleNamespace(dataset="circo", split="val", headline="mAP@10", zero_shot_from="cirr",
                            metrics={"cot": {"mAP@10": 0.125}})
    zero_shot, _ = lineage(trained, circo, {"passed": True})
    assert zero_shot["zero_shot_from_circo"] == "cirr" and zero_shot["evaluated_on_circo"] == "circo/val"
    assert zero_shot["cot_mAP@10_circo"] == "0.1250" and "zero_shot_from_cirr" not in labels
    assert metadata["gates"] == {"cirr": {"passed": True}} and metadata["all_metrics"]["cirr"]["no_cot"]["Avg"] == 0.4
