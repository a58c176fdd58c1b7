"""Retrieval metrics exactly as the benchmarks define them (docs/architecture.md §6), values in [0, 1].

The metric functions take rankings that already exclude whatever the benchmark excludes;
:func:`rank_gallery` makes such rankings from embeddings and applies each benchmark's
reference-exclusion rule (``BenchmarkSpec.excludes_reference``, ``model_code.benchmarks``).

- Recall@K: the share of queries with a ground-truth target in the top K. A query whose targets are
  not in the gallery still counts (as a miss); a ranking shorter than K is read in full.
- Recall_subset@K (CIRR): each ranking restricted to the query's subset, order kept.
- mAP@K (CIRCO): AP@K = sum over k <= K of P(k) * rel(k), divided by min(K, |GT|); the mean over queries.

Ties in similarity keep the gallery's order (a stable sort), so results are reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from model_code.benchmarks import BenchmarkSpec, benchmark
from model_code.index import exact_topk


def _check(rankings, *others) -> None:
    for other in others:
        if len(other) != len(rankings):
            raise ValueError(f"{len(rankings)} rankings but {len(other)} rows of targets/subsets")
    if not len(rankings):
        raise ValueError("no queries to score")


def recall_at_k(
    rankings: Sequence[Sequence[str]], targets: Sequence[Iterable[str]], ks: Iterable[int]
) -> dict[int, float]:
    """Share of queries with at least one target among the first K of their ranking."""
    _check(rankings, targets)
    sets = [set(t) for t in targets]
    out = {}
    for k in ks:
        hits = sum(1 for ranking, gt in zip(rankings, sets) if gt.intersection(ranking[:k]))
        out[k] = hits / len(rankings)
    return out


def recall_subset_at_k(rankings: Sequence[Sequence[str]], targets: Sequence[Iterable[str]],
                       subsets: Sequence[Iterable[str]], ks: Iterable[int]) -> dict[int, float]:
    """Recall@K with each ranking restricted to its query's subset (CIRR's img_set members, from
    which the caller's ranking already removed the reference), order kept."""
    _check(rankings, targets, subsets)
    restricted = []
    for ranking, subset in zip(rankings, subsets):
        members = set(subset)
        restricted.append([i for i in ranking if i in members])
    return recall_at_k(restricted, targets, ks)


def average_precision_at_k(ranking: Sequence[str], targets: Iterable[str], k: int) -> float:
    """CIRCO's AP@K: sum over positions j <= K of precision@j times rel(j), over min(K, |GT|)."""
    gt = set(targets)
    if not gt:
        raise ValueError("AP@K needs at least one ground truth")
    hits, total = 0, 0.0
    for j, image_id in enumerate(ranking[:k], start=1):
        if image_id in gt:
            hits += 1
            total += hits / j
    return total / min(k, len(gt))


def map_at_k(
    rankings: Sequence[Sequence[str]], targets: Sequence[Iterable[str]], ks: Iterable[int]
) -> dict[int, float]:
    """Mean over queries of CIRCO's AP@K."""
    _check(rankings, targets)
    targets = [list(t) for t in targets]
    return {k: sum(average_precision_at_k(r, t, k) for r, t in zip(rankings, targets)) / len(rankings) for k in ks}


def rank_gallery(query_embeddings, gallery_embeddings, gallery_ids: Sequence[str], *,
                 exclude: Sequence[Iterable[str]] | None = None, top: int | None = None) -> list[list[str]]:
    """Gallery ids per query by cosine similarity (embeddings L2-normalised: the dot product),
    highest first, ties in gallery order; ids in ``exclude[i]`` removed from query i's ranking; at
    most ``top`` ids kept (all when None). The gallery index's exact search
    (:func:`model_code.index.exact_topk`), so evaluation and search rank alike by construction."""
    return exact_topk(query_embeddings, gallery_embeddings, gallery_ids, top, exclude=exclude)[0]


def reference_exclusions(spec: BenchmarkSpec | str, reference_ids: Sequence[str]) -> list[set[str]] | None:
    """What :func:`rank_gallery` must exclude for the benchmark ``spec``: each query's reference, or nothing."""
    return [{r} for r in reference_ids] if benchmark(spec).excludes_reference else None
