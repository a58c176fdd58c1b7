"""Metrics against values computed by hand (docs/architecture.md §6)."""

import pytest
import torch

from model_code.evaluation.metrics import (
    average_precision_at_k,
    map_at_k,
    rank_gallery,
    recall_at_k,
    recall_subset_at_k,
    reference_exclusions,
)


def test_recall_at_k_by_hand():
    rankings = [["a", "b", "c", "d"], ["c", "a", "b", "d"], ["d", "c", "b", "a"]]
    targets = [["a"], ["b"], ["x"]]  # the third target is not in the gallery: always a miss
    assert recall_at_k(rankings, targets, [1, 2, 3, 10]) == {1: 1 / 3, 2: 1 / 3, 3: 2 / 3, 10: 2 / 3}


def test_recall_with_several_targets_counts_any_of_them():
    assert recall_at_k([["a", "b", "c"]], [["c", "b"]], [1, 2]) == {1: 0.0, 2: 1.0}


def test_gallery_smaller_than_k_is_read_in_full():
    assert recall_at_k([["a", "b"]], [["b"]], [50]) == {50: 1.0}
    assert map_at_k([["a", "b"]], [["b"]], [5]) == {5: 0.5}


def test_recall_subset_restricts_each_ranking_keeping_its_order():
    rankings = [["a", "b", "c", "d", "e"], ["e", "d", "c", "b", "a"]]
    subsets = [["c", "e", "d"], ["a", "b", "c"]]
    targets = [["d"], ["a"]]
    # restricted: [c, d, e] -> target at 2; [c, b, a] -> target at 3
    assert recall_subset_at_k(rankings, targets, subsets, [1, 2, 3]) == {1: 0.0, 2: 0.5, 3: 1.0}


def test_circo_average_precision_by_hand():
    ranking = ["g1", "x", "g2", "y", "g3"]
    gt = ["g1", "g2", "g3", "g4"]
    # P(1)=1, P(3)=2/3, P(5)=3/5; AP@5 = (1 + 2/3 + 3/5) / min(5, 4)
    assert average_precision_at_k(ranking, gt, 5) == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    # AP@2 = 1 / min(2, 4)
    assert average_precision_at_k(ranking, gt, 2) == pytest.approx(0.5)
    # one ground truth at rank 3: AP@K = (1/3) / 1
    assert average_precision_at_k(["a", "b", "g"], ["g"], 10) == pytest.approx(1 / 3)
    assert map_at_k([ranking, ["a", "b", "g"]], [gt, ["g"]], [5]) == {
        5: pytest.approx(((1 + 2 / 3 + 3 / 5) / 4 + 1 / 3) / 2)
    }


def test_ranking_orders_by_similarity_breaks_ties_by_gallery_order_and_excludes():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    ids = ["a", "b", "c", "d"]
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # a and c tie for the first query: gallery order decides
    assert rank_gallery(queries, gallery, ids) == [["a", "c", "d", "b"], ["b", "d", "a", "c"]]
    assert rank_gallery(queries, gallery, ids, exclude=[{"a"}, set()], top=2) == [["c", "d"], ["b", "d"]]


def test_reference_exclusion_follows_each_benchmark():
    assert reference_exclusions("cirr", ["r1", "r2"]) == [{"r1"}, {"r2"}]
    assert reference_exclusions("synthetic", ["r1"]) == [{"r1"}]
    assert reference_exclusions("circo", ["r1"]) is None and reference_exclusions("fashioniq", ["r1"]) is None
    with pytest.raises(ValueError):
        reference_exclusions("coco", ["r"])


def test_mismatched_or_empty_inputs_are_refused():
    with pytest.raises(ValueError):
        recall_at_k([["a"]], [["a"], ["b"]], [1])
    with pytest.raises(ValueError):
        recall_at_k([], [], [1])
    with pytest.raises(ValueError):
        average_precision_at_k(["a"], [], 5)
