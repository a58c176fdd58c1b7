"""Evaluation of a CIR-CoT model on one benchmark split, in the benchmark's own terms (docs/architecture.md §6).

One gallery per evaluation group (the split's images; FashionIQ: one per category), embedded once;
then the queries of each method, side by side on the same model:

- ``cot``        the model writes its three-part reasoning, then ``<emb>`` (CIR-CoT)
- ``no_cot``     the query prompt goes to ``<emb>`` at once (the ablation, and the fast path)
- ``image_only`` the reference image's gallery embedding as the query (baseline)
- ``text_only``  the modification alone, without the image (baseline)

Rankings exclude what the benchmark excludes (:func:`model_code.metrics.reference_exclusions`).
Scored splits give ``{method: {metric: value}}``; splits with hidden targets (CIRR test1, CIRCO
test) give the files the benchmarks' evaluation servers take (:func:`write_submissions`).
Embeddings are cached under the cache folder by model version and by content (the gallery's image
bytes and ids; for queries also their texts and reference images), so an interrupted evaluation
resumes with what it had finished and a changed gallery is embedded again; a model without a
version (never saved) is not cached at all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import pydantic
import torch

from model_code.benchmarks import BenchmarkSpec, benchmark, zero_shot_from
from model_code.common import FileDigests, Progress, atomic_path, json_key
from model_code.evaluation.metrics import map_at_k, rank_gallery, recall_at_k, recall_subset_at_k, reference_exclusions
from model_code.records import Record

METHODS = ("cot", "no_cot", "image_only", "text_only")
MODEL_METHODS = ("cot", "no_cot")  # the model's own query modes; the other two are baselines
TOP = 50  # ranking depth kept (the largest K, and what the evaluation servers take)


@dataclasses.dataclass
class Group:
    """Queries scored against one gallery."""

    name: str                  # "" or the category (a benchmark with one gallery per category)
    queries: object            # triplets rows (pandas)
    gallery_ids: list[str]
    gallery_paths: list[Path]


@dataclasses.dataclass
class Evaluation:
    spec: BenchmarkSpec
    split: str
    model_version: str
    hidden: bool                                     # targets hidden: no metrics, submission files instead
    metrics: dict[str, dict[str, float]]             # {method: {metric: value}}
    rankings: dict[str, dict[str, list[str]]]        # {method: {query_id: top-50 gallery ids}}
    reasoning: dict[str, dict]                       # {query_id: {"text", "cot", "error"}} of the cot method
    timings: dict[str, dict[str, float]]             # {method or "gallery": {"seconds", "per_s", "n"}}
    queries: object = None  # the evaluated triplets rows
    # a benchmark with subset recall (CIRR): {method: {query_id: the top 3 of the query's subset}}
    subset_rankings: dict[str, dict[str, list[str]]] = dataclasses.field(default_factory=dict)
    # {method: {query_id: headline score}}
    per_query: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    strata: dict[str, str] = dataclasses.field(default_factory=dict)  # {query_id: group}: the headline averages groups
    trained_on: str = ""   # the benchmark the model was fine-tuned on ("" unknown)

    @property
    def dataset(self) -> str:
        return self.spec.name

    @property
    def zero_shot_from(self) -> str | None:
        """The benchmark the model was trained on, when it is not this one (a zero-shot evaluation)."""
        return zero_shot_from(self.dataset, self.trained_on)

    @property
    def headline(self) -> str:
        return self.spec.headline


class EvaluationRecord(Record):
    """What the ``evaluation`` stage hands on to the gate and the promotion: the scores of one model
    on one split, and which model it was. The per-query headline scores (the gate's paired test)
    are in ``<folder>/per_query.json``."""

    dataset: str
    split: str
    folder: str                      # the report: metrics.json, table.md, plots, queries.jsonl, per_query.json
    model_version: str
    model: dict                      # the evaluated model's record (model_code.model.recipes.TrainedModel)
    metrics: dict                    # {method: {metric: value}}
    headline: str
    timings: dict
    raw_version: str = ""
    queries: int = 0
    submissions: list = pydantic.Field(default_factory=list)
    trained_on: str = ""             # the benchmark the model was fine-tuned on (another one: zero-shot)

    @property
    def zero_shot_from(self) -> str | None:
        return zero_shot_from(self.dataset, self.trained_on)

    def per_query(self) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
        """({method: {query_id: headline score}}, {query_id: group}) of the scored queries."""
        path = Path(self.folder) / "per_query.json"
        if not path.is_file():
            return {}, {}
        data = json.loads(path.read_text())
        return data["scores"], data.get("strata", {})


def groups(bench, root: str | os.PathLike, spec: BenchmarkSpec | str, split: str,
           limit: int | None = None) -> list[Group]:
    """The evaluation groups of ``split``: its queries and gallery (per category where the benchmark
    has categories). ``limit`` keeps the first queries of each group (quick runs)."""
    spec, root = benchmark(spec), Path(root)
    t, im = bench.triplets, bench.images
    t, im = t[t["split"] == split], im[im["split"] == split]
    if not len(t):
        raise ValueError(f"{spec.name}: split {split!r} has no queries in the tables")
    names = sorted(set(t["category"].dropna())) if spec.categories else [""]
    out = []
    for name in names:
        q = t[t["category"] == name] if name else t
        g = im[im["category"] == name] if name else im
        if limit is not None:
            q = q.iloc[:limit]
        if not len(g):
            raise ValueError(f"{spec.name}/{split}{'/' + name if name else ''}: the gallery is empty")
        out.append(Group(name, q.reset_index(drop=True), list(g["image_id"]), [root / p for p in g["path"]]))
    return out


# ---------------------------------------------------------------------------------------------
# embedding, with progress and a per-model-version cache


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _cached(path: Path | None, compute: Callable[[], object]) -> tuple[object, bool]:
    """(value, whether it came from the cache)."""
    if path is not None and path.is_file():
        return torch.load(path, weights_only=False), True
    value = compute()
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save(value, tmp)
    return value, False


def embed_method(
    model,
    method: str,
    group: Group,
    gallery: torch.Tensor,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    say: Callable[[str], None] = print,
) -> tuple[torch.Tensor, list[dict] | None]:
    """Query embeddings [n, hidden] of ``group`` for ``method``, and for ``cot`` the reasoning per query."""
    q = group.queries
    refs = list(q["reference_id"])
    index = {i: k for k, i in enumerate(group.gallery_ids)}
    path_of = dict(zip(group.gallery_ids, group.gallery_paths))
    if method == "image_only":
        missing = [r for r in dict.fromkeys(refs) if r not in index]
        if missing:
            raise ValueError(
                f"image_only: {len(missing)} reference images are not in the gallery (first: {missing[0]})"
            )
        return gallery[[index[r] for r in refs]], None
    if method == "text_only":
        return model.embed_texts(list(q["modification"]), batch_size=batch_size), None
    if method not in MODEL_METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    missing = [r for r in refs if r not in path_of]
    if missing:
        raise ValueError(f"{len(missing)} reference images are not among the split's images (first: {missing[0]})")
    images, texts = [path_of[r] for r in refs], list(q["modification"])
    progress = Progress(len(texts), f"{method} queries{' ' + group.name if group.name else ''}", say=say, every_s=20)
    embs, reasoning = [], []
    for s in _chunks(len(texts), batch_size):
        e, r = model.infer_queries(images[s], texts[s], method, max_new_tokens=max_new_tokens, batch_size=batch_size)
        embs.append(e)
        reasoning += r
        progress.update(s.stop)
    return torch.cat(embs), (reasoning if method == "cot" else None)


def evaluate(model, bench, root: str | os.PathLike, spec: BenchmarkSpec | str, split: str, *,
             methods: Sequence[str] = METHODS, trained_on: str = "",
             batch_size: int = 32, max_new_tokens: int = 256, cache_dir: str | os.PathLike | None = None,
             limit: int | None = None, say: Callable[[str], None] = print) -> Evaluation:
    """Embed the gallery and the queries of ``split`` with ``model`` and score every method
    (nothing to score where the split hides its targets: rankings only). ``trained_on``: the
    benchmark the model was fine-tuned on, which the report names when it is another one (zero-shot)."""
    spec = benchmark(spec)
    version = getattr(model, "version", None)
    cache = Path(cache_dir) / version if cache_dir and version else None
    digest = FileDigests()
    hidden = split in spec.hidden_splits
    timings: dict[str, dict[str, float]] = {}
    rankings: dict[str, dict[str, list[str]]] = {m: {} for m in methods}
    reasoning: dict[str, dict] = {}
    subset_rankings: dict[str, dict[str, list[str]]] = {}
    per_group: list[tuple[Group, dict[str, list[list[str]]]]] = []
    for group in groups(bench, root, spec, split, limit):
        t0 = time.monotonic()
        progress = Progress(len(group.gallery_paths), f"gallery{' ' + group.name if group.name else ''}", say=say,
                            every_s=20)

        def embed_gallery(group=group, progress=progress):   # called at once, in this iteration
            parts = []
            for s in _chunks(len(group.gallery_paths), batch_size * 2):
                parts.append(model.embed_images(group.gallery_paths[s], batch_size=batch_size * 2))
                progress.update(s.stop)
            return torch.cat(parts)

        gallery_key = json_key(group.gallery_ids, [digest(p) for p in group.gallery_paths], length=16)
        gallery, hit = _cached(cache / f"gallery-{gallery_key}.pt" if cache else None, embed_gallery)
        path_of = dict(zip(group.gallery_ids, group.gallery_paths))
        query_key = json_key(gallery_key, list(group.queries["query_id"]), list(group.queries["modification"]),
                             [digest(path_of[r]) if r in path_of else r for r in group.queries["reference_id"]],
                             length=16)
        if not hit:  # a throughput only for what was computed now, not read from the cache
            _add_timing(timings, "gallery", time.monotonic() - t0, len(group.gallery_ids))
        exclude = reference_exclusions(spec, list(group.queries["reference_id"]))
        ranked = {}
        for method in methods:
            t0 = time.monotonic()
            # what changes the result: the content, the method, and for cot the token budget and the decoding
            key = f"{query_key}-{method}" + (
                f"-{max_new_tokens}tok-{getattr(model, 'decoding', '')}" if method == "cot" else "")
            compute = functools.partial(embed_method, model, method, group, gallery, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens, say=say)
            (emb, reas), hit = _cached(cache / f"{key}.pt" if cache else None, compute)
            if not hit:
                _add_timing(timings, method, time.monotonic() - t0, len(group.queries))
            # every metric reads the top 50, except subset recall, which needs the whole order
            # (CIRR's galleries are small; CIRCO's 120k-image one is not kept whole per query)
            ranked[method] = rank_gallery(emb, gallery, group.gallery_ids, exclude=exclude,
                                          top=None if spec.subset_ks else TOP)
            rankings[method].update({q: r[:TOP] for q, r in zip(group.queries["query_id"], ranked[method])})
            if spec.subset_ks:
                for q, r, members in zip(group.queries["query_id"], ranked[method], group.queries["subset_ids"]):
                    keep = set(members)
                    subset_rankings.setdefault(method, {})[q] = [i for i in r if i in keep][:max(spec.subset_ks)]
            if reas is not None:
                reasoning.update(dict(zip(group.queries["query_id"], reas)))
        per_group.append((group, ranked))
    metrics = {} if hidden else score(spec, per_group, methods)
    per_query = {} if hidden else {m: headline_per_query(spec, per_group, m) for m in methods}
    strata = {q: group.name for group, _ in per_group for q in group.queries["query_id"]}
    queries = pd.concat([g.queries for g, _ in per_group], ignore_index=True)
    if "cot" in methods and not hidden:
        metrics["cot"]["cot_parsed"] = sum(reasoning.get(q, {}).get("cot") is not None
                                           for q in queries["query_id"]) / max(len(queries), 1)
        correctness = spec.hooks.reasoning_correctness
        if correctness is not None:  # the dataset can tell a right conclusion from a wrong one
            metrics["cot"].update(correctness(root, split, queries, reasoning))
    return Evaluation(spec, split, version or "unsaved", hidden, metrics, rankings, reasoning, timings, queries,
                      subset_rankings, per_query, strata, trained_on)



def _add_timing(timings: dict, key: str, seconds: float, n: int) -> None:
    t = timings.setdefault(key, {"seconds": 0.0, "n": 0})
    t["seconds"] = round(t["seconds"] + seconds, 2)
    t["n"] += n
    t["per_s"] = round(t["n"] / t["seconds"], 2) if t["seconds"] else float("inf")


# ---------------------------------------------------------------------------------------------
# scoring


def _recall_keys(values: dict[int, float], prefix: str = "R") -> dict[str, float]:
    return {f"{prefix}@{k}": v for k, v in values.items()}


def score(spec: BenchmarkSpec | str, per_group: list[tuple[Group, dict[str, list[list[str]]]]],
          methods: Sequence[str]) -> dict:
    """``{method: {metric: value}}`` for the benchmark ``spec`` from full rankings (reference already excluded)."""
    spec = benchmark(spec)
    return {method: _score_method(spec, per_group, method) for method in methods}


def _group_metrics(spec: BenchmarkSpec, group: Group, ranking: list[list[str]]) -> dict[str, float]:
    """The benchmark's metrics on one gallery: Recall@K or mAP@K, and subset recall where it has one."""
    targets = list(group.queries["target_ids"])
    per_k = map_at_k if spec.metric == "map" else recall_at_k
    m = _recall_keys(per_k(ranking, targets, spec.ks), spec.metric_prefix)
    if spec.subset_ks:
        m.update(_recall_keys(recall_subset_at_k(ranking, targets, list(group.queries["subset_ids"]), spec.subset_ks),
                              "R_subset"))
    return m


def _score_method(spec: BenchmarkSpec, per_group, method: str, *, breakdowns: bool = True) -> dict[str, float]:
    """One method's metrics: each gallery's (by category where there are several, then their mean),
    the headline where it is a mean of metrics, and the breakdowns the triplets allow."""
    by_group = [(group, _group_metrics(spec, group, ranked[method])) for group, ranked in per_group]
    m: dict[str, float] = {}
    if spec.categories:
        for group, values in by_group:
            m.update({f"{group.name}/{k}": v for k, v in values.items()})
    for k in by_group[0][1]:
        m[k] = sum(values[k] for _, values in by_group) / len(by_group)
    if spec.headline_of:
        m[spec.headline] = sum(m[k] for k in spec.headline_of) / len(spec.headline_of)
    if breakdowns and not spec.categories:
        (group, ranked), = per_group
        m.update(breakdown(group.queries, ranked[method]))
    return m


def headline_per_query(spec: BenchmarkSpec | str, per_group: list[tuple[Group, dict[str, list[list[str]]]]],
                       method: str) -> dict[str, float]:
    """Each query's share of the headline metric: the query scored alone by :func:`score`'s own
    rules (what a paired comparison of two methods needs). Their mean is the headline; with
    categories the mean of each category's mean (``Evaluation.strata`` groups the queries)."""
    spec = benchmark(spec)
    out = {}
    for group, ranked in per_group:
        q = group.queries
        for i, qid in enumerate(q["query_id"]):
            alone = dataclasses.replace(group, queries=q.iloc[[i]])
            out[qid] = _score_method(spec, [(alone, {method: [ranked[method][i]]})], method,
                                     breakdowns=False)[spec.headline]
    return out


def breakdown(queries, ranked: list[list[str]], ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Recall@K by number of edits and by reference-dependence (the query's text cannot be resolved
    without the reference image), plus the group sizes, where the triplets record them (the optional
    ``n_edits`` / ``reference_dependent`` columns; nothing for a benchmark that leaves them null)."""
    out = {}
    targets = list(queries["target_ids"])
    groups_ = [(f"edits={n}", queries["n_edits"] == n) for n in sorted(set(queries["n_edits"].dropna()))]
    groups_ += [("ref_dependent", queries["reference_dependent"] == True),  # noqa: E712 (pandas mask)
                ("ref_independent", queries["reference_dependent"] == False)]  # noqa: E712
    for name, mask in groups_:
        rows = [i for i, keep in enumerate(mask.fillna(False).tolist()) if keep]
        if not rows:
            continue
        values = recall_at_k([ranked[i] for i in rows], [targets[i] for i in rows], ks)
        out.update({f"R@{k}[{name}]": v for k, v in values.items()})
        out[f"n[{name}]"] = len(rows)
    return out
