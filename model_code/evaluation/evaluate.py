"""Evaluation of a CIR-CoT model on one benchmark split, in the benchmark's own terms (DESIGN.md §6).

One gallery per evaluation group (the split's images; FashionIQ: one per category), embedded once;
then the queries of each method, side by side on the same model:

- ``cot``        the model writes its three-part reasoning, then ``<emb>`` (CIR-CoT)
- ``no_cot``     the query prompt goes to ``<emb>`` at once (the ablation, and the fast path)
- ``image_only`` the reference image's gallery embedding as the query (baseline)
- ``text_only``  the modification alone, without the image (baseline)

Rankings exclude what the benchmark excludes (:func:`model_code.metrics.reference_exclusions`).
Scored splits give ``{method: {metric: value}}``; splits with hidden targets (CIRR test1, CIRCO
test) give the files the benchmarks' evaluation servers take (:func:`write_submissions`).
Embeddings are cached per model version under the output folder, so an interrupted evaluation
resumes with what it had finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from model_code.data.readers import HIDDEN_SPLITS
from model_code.evaluation.metrics import map_at_k, rank_gallery, recall_at_k, recall_subset_at_k, reference_exclusions
from model_code.common import Progress

METHODS = ("cot", "no_cot", "image_only", "text_only")
MODEL_METHODS = ("cot", "no_cot")  # the model's own query modes; the other two are baselines
KS = {"synthetic": (1, 5, 10, 50), "cirr": (1, 5, 10, 50), "fashioniq": (10, 50), "circo": (5, 10, 25, 50)}
SUBSET_KS = (1, 2, 3)
# the one number per benchmark that the gate's regression check and the model labels use
HEADLINE = {"synthetic": "R@10", "cirr": "Avg", "fashioniq": "Avg", "circo": "mAP@10"}
# the split each benchmark is scored on, and its split with hidden targets (submission files)
SCORED_SPLIT = {"synthetic": "test", "cirr": "val", "fashioniq": "val", "circo": "val"}
SUBMISSION_SPLIT = {"cirr": "test1", "circo": "test"}
TOP = 50  # ranking depth kept (the largest K, and what the evaluation servers take)


@dataclasses.dataclass
class Group:
    """Queries scored against one gallery."""

    name: str                  # "" or the FashionIQ category
    queries: object            # triplets rows (pandas)
    gallery_ids: list[str]
    gallery_paths: list[Path]


@dataclasses.dataclass
class Evaluation:
    dataset: str
    split: str
    model_version: str
    hidden: bool                                     # targets hidden: no metrics, submission files instead
    metrics: dict[str, dict[str, float]]             # {method: {metric: value}}
    rankings: dict[str, dict[str, list[str]]]        # {method: {query_id: top-50 gallery ids}}
    reasoning: dict[str, dict]                       # {query_id: {"text", "cot", "error"}} of the cot method
    timings: dict[str, dict[str, float]]             # {method or "gallery": {"seconds", "per_s", "n"}}
    queries: object = None                           # the evaluated triplets rows
    subset_rankings: dict[str, dict[str, list[str]]] = dataclasses.field(default_factory=dict)  # CIRR: top-3 of the subset
    per_query: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # {method: {query_id: headline score}}

    @property
    def headline(self) -> str:
        return HEADLINE[self.dataset]


def groups(bench, root: str | os.PathLike, dataset: str, split: str, limit: int | None = None) -> list[Group]:
    """The evaluation groups of ``split``: its queries and gallery (FashionIQ: per category).
    ``limit`` keeps the first queries of each group (quick runs)."""
    root = Path(root)
    t, im = bench.triplets, bench.images
    t, im = t[t["split"] == split], im[im["split"] == split]
    if not len(t):
        raise ValueError(f"{dataset}: split {split!r} has no queries in the tables")
    names = sorted(set(t["category"].dropna())) if dataset == "fashioniq" else [""]
    out = []
    for name in names:
        q = t[t["category"] == name] if name else t
        g = im[im["category"] == name] if name else im
        if limit is not None:
            q = q.iloc[:limit]
        if not len(g):
            raise ValueError(f"{dataset}/{split}{'/' + name if name else ''}: the gallery is empty")
        out.append(Group(name, q.reset_index(drop=True), list(g["image_id"]), [root / p for p in g["path"]]))
    return out


# ---------------------------------------------------------------------------------------------
# embedding, with progress and a per-model-version cache


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _cached(path: Path | None, compute: Callable[[], object]):
    if path is not None and path.is_file():
        return torch.load(path, weights_only=False)
    value = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(value, tmp)
        tmp.replace(path)
    return value


def embed_method(model, method: str, group: Group, gallery: torch.Tensor, *, batch_size: int = 32,
                 max_new_tokens: int = 256, say: Callable[[str], None] = print) -> tuple[torch.Tensor, list[dict] | None]:
    """Query embeddings [n, hidden] of ``group`` for ``method``, and for ``cot`` the reasoning per query."""
    q = group.queries
    refs = list(q["reference_id"])
    index = {i: k for k, i in enumerate(group.gallery_ids)}
    path_of = dict(zip(group.gallery_ids, group.gallery_paths))
    if method == "image_only":
        missing = [r for r in dict.fromkeys(refs) if r not in index]
        if missing:
            raise ValueError(f"image_only: {len(missing)} reference images are not in the gallery (first: {missing[0]})")
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


def evaluate(model, bench, root: str | os.PathLike, dataset: str, split: str, *, methods: Sequence[str] = METHODS,
             batch_size: int = 32, max_new_tokens: int = 256, cache_dir: str | os.PathLike | None = None,
             limit: int | None = None, say: Callable[[str], None] = print) -> Evaluation:
    """Embed the gallery and the queries of ``split`` with ``model`` and score every method
    (nothing to score where the split hides its targets: rankings only)."""
    version = getattr(model, "version", None) or "unsaved"
    cache = Path(cache_dir) / version / f"{split}{'-' + str(limit) if limit else ''}" if cache_dir else None
    hidden = (dataset, split) in HIDDEN_SPLITS
    timings: dict[str, dict[str, float]] = {}
    rankings: dict[str, dict[str, list[str]]] = {m: {} for m in methods}
    reasoning: dict[str, dict] = {}
    subset_rankings: dict[str, dict[str, list[str]]] = {}
    per_group: list[tuple[Group, dict[str, list[list[str]]]]] = []
    for group in groups(bench, root, dataset, split, limit):
        tag = group.name or "all"
        t0 = time.monotonic()
        progress = Progress(len(group.gallery_paths), f"gallery{' ' + group.name if group.name else ''}", say=say,
                            every_s=20)

        def embed_gallery():
            parts = []
            for s in _chunks(len(group.gallery_paths), batch_size * 2):
                parts.append(model.embed_images(group.gallery_paths[s], batch_size=batch_size * 2))
                progress.update(s.stop)
            return torch.cat(parts)

        gallery = _cached(cache / f"{tag}-gallery.pt" if cache else None, embed_gallery)
        _add_timing(timings, "gallery", time.monotonic() - t0, len(group.gallery_ids))
        exclude = reference_exclusions(dataset, list(group.queries["reference_id"]))
        ranked = {}
        for method in methods:
            t0 = time.monotonic()
            key = f"{tag}-{method}" + (f"-{max_new_tokens}tok" if method == "cot" else "")  # what changes the result
            emb, reas = _cached(cache / f"{key}.pt" if cache else None,
                                lambda: embed_method(model, method, group, gallery, batch_size=batch_size,
                                                     max_new_tokens=max_new_tokens, say=say))
            _add_timing(timings, method, time.monotonic() - t0, len(group.queries))
            # every metric reads the top 50, except CIRR's subset recall, which needs the whole order
            # (CIRR's galleries are small; CIRCO's 120k-image one is not kept whole per query)
            ranked[method] = rank_gallery(emb, gallery, group.gallery_ids, exclude=exclude,
                                          top=None if dataset == "cirr" else TOP)
            rankings[method].update({q: r[:TOP] for q, r in zip(group.queries["query_id"], ranked[method])})
            if dataset == "cirr":
                for q, r, members in zip(group.queries["query_id"], ranked[method], group.queries["subset_ids"]):
                    keep = set(members)
                    subset_rankings.setdefault(method, {})[q] = [i for i in r if i in keep][:3]
            if reas is not None:
                reasoning.update(dict(zip(group.queries["query_id"], reas)))
        per_group.append((group, ranked))
    metrics = {} if hidden else score(dataset, per_group, methods)
    per_query = {} if hidden else {m: headline_per_query(dataset, per_group, m) for m in methods}
    if dataset == "synthetic" and "cot" in methods and not hidden:
        metrics["cot"].update(reasoning_correctness(root, split, per_group[0][0].queries, reasoning))
    import pandas as pd

    queries = pd.concat([g.queries for g, _ in per_group], ignore_index=True)
    return Evaluation(dataset, split, version, hidden, metrics, rankings, reasoning, timings, queries, subset_rankings,
                      per_query)


def _add_timing(timings: dict, key: str, seconds: float, n: int) -> None:
    t = timings.setdefault(key, {"seconds": 0.0, "n": 0})
    t["seconds"] = round(t["seconds"] + seconds, 2)
    t["n"] += n
    t["per_s"] = round(t["n"] / t["seconds"], 2) if t["seconds"] else float("inf")


# ---------------------------------------------------------------------------------------------
# scoring


def _recall_keys(values: dict[int, float], prefix: str = "R") -> dict[str, float]:
    return {f"{prefix}@{k}": v for k, v in values.items()}


def score(dataset: str, per_group: list[tuple[Group, dict[str, list[list[str]]]]], methods: Sequence[str]) -> dict:
    """``{method: {metric: value}}`` for ``dataset`` from full rankings (reference already excluded)."""
    ks = KS[dataset]
    out = {}
    for method in methods:
        m: dict[str, float] = {}
        if dataset == "fashioniq":
            for group, ranked in per_group:
                for k, v in recall_at_k(ranked[method], list(group.queries["target_ids"]), ks).items():
                    m[f"{group.name}/R@{k}"] = v
            for k in ks:
                m[f"R@{k}"] = sum(m[f"{g.name}/R@{k}"] for g, _ in per_group) / len(per_group)
            m["Avg"] = sum(m[f"R@{k}"] for k in ks) / len(ks)
        else:
            (group, ranked), = per_group
            targets = list(group.queries["target_ids"])
            if dataset == "circo":
                m.update(_recall_keys(map_at_k(ranked[method], targets, ks), "mAP"))
            else:
                m.update(_recall_keys(recall_at_k(ranked[method], targets, ks)))
            if dataset == "cirr":
                m.update(_recall_keys(recall_subset_at_k(ranked[method], targets, list(group.queries["subset_ids"]),
                                                         SUBSET_KS), "R_subset"))
                m["Avg"] = (m["R@5"] + m["R_subset@1"]) / 2
            if dataset == "synthetic":
                m.update(breakdown(group.queries, ranked[method]))
        out[method] = m
    return out


def headline_per_query(dataset: str, per_group: list[tuple[Group, dict[str, list[list[str]]]]],
                       method: str) -> dict[str, float]:
    """Each query's share of the headline metric (its mean over queries is the headline, or for
    FashionIQ its per-query form), scored alone by the metric functions: what a paired comparison
    of two methods needs."""
    out = {}
    for group, ranked in per_group:
        q = group.queries
        for i, (qid, targets) in enumerate(zip(q["query_id"], q["target_ids"])):
            r, gt = [ranked[method][i]], [targets]
            if dataset == "synthetic":
                value = recall_at_k(r, gt, [10])[10]
            elif dataset == "cirr":
                value = (recall_at_k(r, gt, [5])[5] + recall_subset_at_k(r, gt, [q["subset_ids"].iloc[i]], [1])[1]) / 2
            elif dataset == "fashioniq":
                value = sum(recall_at_k(r, gt, KS["fashioniq"]).values()) / len(KS["fashioniq"])
            else:
                value = map_at_k(r, gt, [10])[10]
            out[qid] = value
    return out


def breakdown(queries, ranked: list[list[str]], ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Synthetic: Recall@K by number of edits and by reference-dependence (the query's text cannot
    be resolved without the reference image), plus the group sizes."""
    out = {}
    targets = list(queries["target_ids"])
    groups_ = [(f"edits={n}", queries["n_edits"] == n) for n in sorted(set(queries["n_edits"].dropna()))]
    groups_ += [("ref_dependent", queries["reference_dependent"] == True),  # noqa: E712 (pandas mask)
                ("ref_independent", queries["reference_dependent"] == False)]  # noqa: E712
    for name, mask in groups_:
        rows = [i for i, keep in enumerate(mask.tolist()) if keep]
        if not rows:
            continue
        values = recall_at_k([ranked[i] for i in rows], [targets[i] for i in rows], ks)
        out.update({f"R@{k}[{name}]": v for k, v in values.items()})
        out[f"n[{name}]"] = len(rows)
    return out


def reasoning_correctness(root: str | os.PathLike, split: str, queries, reasoning: dict[str, dict]) -> dict[str, float]:
    """Synthetic: how often the generated chain parses, and whether its conclusion states the
    target's objects (every object's size, colour, shape and place; see
    :func:`model_code.oracle.scene_from_text`)."""
    from model_code.synthetic import generate as syn
    from model_code.synthetic.oracle import scene_from_text

    graphs = json.loads((Path(root) / "scene_graphs" / f"{split}.json").read_text())
    parsed = exact = 0
    f1s = []
    for qid, targets in zip(queries["query_id"], queries["target_ids"]):
        r = reasoning.get(qid) or {}
        cot = r.get("cot")
        truth = {syn.scene_key((o,))[0] for o in syn.scene_from_json(graphs[targets[0]])}
        stated = scene_from_text(cot.conclusion) if cot is not None else set()
        parsed += cot is not None
        exact += stated == truth
        hit = len(stated & truth)
        f1s.append(2 * hit / (len(stated) + len(truth)) if stated or truth else 1.0)
    n = max(len(queries), 1)
    return {"cot_parsed": parsed / n, "conclusion_exact": exact / n, "conclusion_object_f1": sum(f1s) / n}


# ---------------------------------------------------------------------------------------------
# outputs: metrics.json, a markdown table, plots, per-query reasoning, submission files


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown_table(ev: Evaluation) -> str:
    """The methods side by side: the benchmark's metrics, then (synthetic) the breakdowns and
    reasoning correctness, then speed."""
    if ev.hidden:
        n = len(next(iter(ev.rankings.values()), {}))
        return (f"{ev.dataset}/{ev.split}: targets are hidden; {n} queries ranked, "
                f"submission files written for the evaluation server.\n")
    methods = list(ev.metrics)
    shared = [k for k in ev.metrics[methods[0]] if all(k in ev.metrics[m] for m in methods)]
    main = [k for k in shared if "[" not in k and "/" not in k]
    lines = [f"### {ev.dataset} / {ev.split} — model {ev.model_version} ({len(ev.queries)} queries)", "",
             "| method | " + " | ".join(main) + " | queries/s |", "|---" * (len(main) + 2) + "|"]
    for m in methods:
        speed = ev.timings.get(m, {}).get("per_s", "")
        lines.append(f"| {m} | " + " | ".join(_fmt(ev.metrics[m][k]) for k in main) + f" | {_fmt(speed)} |")
    extra = [k for k in shared if "[" in k or "/" in k]
    if extra:
        lines += ["", "| method | " + " | ".join(extra) + " |", "|---" * (len(extra) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(_fmt(ev.metrics[m].get(k, "")) for k in extra) + " |" for m in methods]
    cot_only = [k for k in ev.metrics.get("cot", {}) if k.startswith(("cot_", "conclusion_"))]
    if cot_only:
        lines += ["", "Reasoning (cot): " + ", ".join(f"{k} {ev.metrics['cot'][k]:.3f}" for k in cot_only)]
    gallery = ev.timings.get("gallery")
    if gallery:
        lines += ["", f"Gallery: {gallery['n']} images embedded at {gallery['per_s']:.1f}/s."]
    return "\n".join(lines) + "\n"


def plot_recall(ev: Evaluation, path: str | os.PathLike) -> Path:
    """Recall@K (or mAP@K) per method, one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = "mAP" if ev.dataset == "circo" else "R"
    ks = KS[ev.dataset]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, m in ev.metrics.items():
        ax.plot(ks, [m[f"{prefix}@{k}"] for k in ks], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K")
    ax.set_ylabel(f"{prefix}@K")
    ax.set_ylim(0, 1)
    ax.set_title(f"{ev.dataset} / {ev.split}")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_qualitative(ev: Evaluation, image_paths: dict[str, Path], path: str | os.PathLike, n: int = 4,
                     method: str = "cot") -> Path:
    """A grid: per query, the reference, the modification and generated reasoning, and the top-5
    results with the target framed in green."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    method = method if method in ev.rankings else next(iter(ev.rankings))
    rows = ev.queries.iloc[:n]
    fig, axes = plt.subplots(len(rows), 7, figsize=(16, 2.6 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.6, 1, 1, 1, 1, 1]})
    for ax_row, (_, q) in zip(axes, rows.iterrows()):
        for ax in ax_row:
            ax.axis("off")
        with Image.open(image_paths[q["reference_id"]]) as im:
            ax_row[0].imshow(im.convert("RGB"))
        ax_row[0].set_title("reference", fontsize=8)
        r = ev.reasoning.get(q["query_id"], {})
        text = f"Modification: {q['modification']}\n\n" + (r.get("text") or "(no reasoning: " + method + ")")
        ax_row[1].text(0, 1, "\n".join(textwrap.wrap(text, 70, replace_whitespace=False)[:14]), fontsize=6.5,
                       va="top", family="monospace", transform=ax_row[1].transAxes)
        targets = set(q["target_ids"])
        for j, image_id in enumerate(ev.rankings[method].get(q["query_id"], [])[:5]):
            ax = ax_row[2 + j]
            with Image.open(image_paths[image_id]) as im:
                ax.imshow(im.convert("RGB"))
            hit = image_id in targets
            ax.set_title(f"#{j + 1}{' target' if hit else ''}", fontsize=8, color="green" if hit else "black")
            if hit:
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_edgecolor("green")
                    spine.set_linewidth(4)
    fig.suptitle(f"{ev.dataset} / {ev.split}: {method} (model {ev.model_version})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def submissions(ev: Evaluation, method: str) -> dict[str, dict]:
    """The evaluation servers' files for ``method``: CIRR (rc2: top-50 for Recall, top-3 of the
    query's subset for Recall_subset, keyed by pairid) and CIRCO (top-50 image ids keyed by the
    query id of its test.json)."""
    ranks = ev.rankings[method]
    if ev.dataset == "cirr":
        recall = {"version": "rc2", "metric": "recall"}
        subset = {"version": "rc2", "metric": "recall_subset"}
        for qid in ev.queries["query_id"]:
            recall[qid] = ranks[qid][:50]
            subset[qid] = ev.subset_rankings[method][qid]
        return {f"cirr_{ev.split}_{method}_recall.json": recall, f"cirr_{ev.split}_{method}_recall_subset.json": subset}
    if ev.dataset == "circo":
        prefix = f"{ev.split}-"
        return {f"circo_{ev.split}_{method}.json": {qid[len(prefix):] if qid.startswith(prefix) else qid: ranks[qid][:50]
                                                    for qid in ev.queries["query_id"]}}
    return {}


def _jsonable(r: dict) -> dict:
    cot = r.get("cot")
    return {"text": r.get("text"), "cot": dataclasses.asdict(cot) if cot is not None else None, "error": r.get("error")}


def write_report(ev: Evaluation, out_dir: str | os.PathLike, image_paths: dict[str, Path] | None = None) -> dict[str, Path]:
    """Write metrics.json, table.md, evaluation.json (timings, versions), queries.jsonl (per query:
    reasoning and top-10 per method), the plots, and the submission files of a hidden split.
    Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}

    def dump(name: str, obj) -> Path:
        p = out / name
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1))
        tmp.replace(p)
        written[name] = p
        return p

    if not ev.hidden:
        dump("metrics.json", ev.metrics)
        written["recall.png"] = plot_recall(ev, out / "recall.png")
    else:
        for method in [m for m in MODEL_METHODS if m in ev.rankings]:
            for name, content in submissions(ev, method).items():
                dump(name, content)
    dump("evaluation.json", {"dataset": ev.dataset, "split": ev.split, "model_version": ev.model_version,
                             "hidden": ev.hidden, "headline": ev.headline, "queries": len(ev.queries),
                             "timings": ev.timings})
    (out / "table.md").write_text(markdown_table(ev))
    written["table.md"] = out / "table.md"
    with open(out / "queries.jsonl", "w") as f:
        for q in ev.queries.itertuples():
            row = {"query_id": q.query_id, "reference_id": q.reference_id, "modification": q.modification,
                   "target_ids": list(q.target_ids), "top10": {m: ev.rankings[m].get(q.query_id, [])[:10] for m in ev.rankings}}
            if q.query_id in ev.reasoning:
                row["reasoning"] = _jsonable(ev.reasoning[q.query_id])
            f.write(json.dumps(row) + "\n")
    written["queries.jsonl"] = out / "queries.jsonl"
    if image_paths is not None and not ev.hidden:
        written["qualitative.png"] = plot_qualitative(ev, image_paths, out / "qualitative.png")
    return written
