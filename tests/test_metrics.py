import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.scoring.metrics import (
    average_precision,
    mean_average_precision,
    ndcg_at_k,
    rank_distance,
    ranks_of,
    recall_at_k,
)


def _ranks(scores, relevant):
    return ranks_of(np.array(scores, dtype=float), np.array(relevant, dtype=np.int64))


# --- hand-worked examples -------------------------------------------------------


def test_single_relevant_second():
    ranks = _ranks([[0.9, 0.5, 0.7, 0.1]], [[2]])
    assert ranks.tolist() == [[2]]
    assert average_precision(ranks).tolist() == [0.5]
    assert recall_at_k(ranks, 1).tolist() == [0.0]
    assert recall_at_k(ranks, 2).tolist() == [1.0]
    assert rank_distance(ranks).tolist() == [0]


def test_single_relevant_top_and_bottom():
    ranks = _ranks([[0.9, 0.5, 0.7, 0.1], [0.9, 0.5, 0.7, 0.1]], [[0], [3]])
    assert ranks.tolist() == [[1], [4]]
    np.testing.assert_allclose(average_precision(ranks), [1.0, 0.25])


def test_two_relevant_at_ranks_1_and_3():
    ranks = _ranks([[0.9, 0.5, 0.7, 0.1]], [[0, 1]])
    assert ranks.tolist() == [[1, 3]]
    np.testing.assert_allclose(average_precision(ranks), [(1 / 1 + 2 / 3) / 2])
    np.testing.assert_allclose(recall_at_k(ranks, 1), [0.5])
    np.testing.assert_allclose(recall_at_k(ranks, 2), [0.5])
    np.testing.assert_allclose(recall_at_k(ranks, 3), [1.0])
    assert rank_distance(ranks).tolist() == [2]


def test_order_of_relevant_columns_does_not_matter():
    a = _ranks([[0.9, 0.5, 0.7, 0.1]], [[0, 1]])
    b = _ranks([[0.9, 0.5, 0.7, 0.1]], [[1, 0]])
    assert b.tolist() == [[3, 1]]
    np.testing.assert_allclose(average_precision(a), average_precision(b))


def test_relevant_tied_with_nonrelevant_gets_worse_rank():
    ranks = _ranks([[0.8, 0.8, 0.1]], [[1]])
    assert ranks.tolist() == [[2]]
    assert average_precision(ranks).tolist() == [0.5]
    assert recall_at_k(ranks, 1).tolist() == [0.0]


def test_constant_scores_are_not_perfect():
    ranks = _ranks([[0.3, 0.3, 0.3, 0.3]], [[0]])
    assert ranks.tolist() == [[4]]
    assert average_precision(ranks).tolist() == [0.25]


def test_two_relevant_tied_with_each_other():
    # Both on top, tied: each sits after the other -> rank 2; AP still 1 (both precede all others).
    ranks = _ranks([[0.9, 0.9, 0.5]], [[0, 1]])
    assert ranks.tolist() == [[2, 2]]
    assert average_precision(ranks).tolist() == [1.0]
    assert recall_at_k(ranks, 1).tolist() == [0.0]
    assert recall_at_k(ranks, 2).tolist() == [1.0]
    assert rank_distance(ranks).tolist() == [0]


def test_two_relevant_tied_below_a_nonrelevant():
    # sklearn: one threshold at 0.5 holding both relevant and 3 items -> AP = 2/3.
    ranks = _ranks([[0.5, 0.9, 0.5, 0.1]], [[0, 2]])
    assert ranks.tolist() == [[3, 3]]
    np.testing.assert_allclose(average_precision(ranks), [2 / 3])


def test_padding():
    scores = [[0.9, 0.5, 0.7, 0.1], [0.9, 0.5, 0.7, 0.1]]
    ranks = _ranks(scores, [[2, -1, -1], [0, -1, 1]])
    assert ranks.tolist() == [[2, 0, 0], [1, 0, 3]]
    np.testing.assert_allclose(average_precision(ranks), [0.5, (1 + 2 / 3) / 2])
    np.testing.assert_allclose(recall_at_k(ranks, 2), [1.0, 0.5])
    assert rank_distance(ranks).tolist() == [0, 2]
    assert mean_average_precision(ranks) == pytest.approx((0.5 + (1 + 2 / 3) / 2) / 2)


def test_rank_distance_examples():
    ranks = np.array([[1, 2, 10], [5, 0, 0], [7, 3, 0], [4, 4, 0]])
    assert rank_distance(ranks).tolist() == [9, 0, 4, 0]


def test_padding_only_row_gives_zero_ranks_but_metrics_reject_it():
    ranks = _ranks([[0.9, 0.5], [0.1, 0.2]], [[0], [-1]])
    assert ranks.tolist() == [[1], [0]]
    for metric in (average_precision, rank_distance, lambda r: recall_at_k(r, 1)):
        with pytest.raises(ValueError, match="at least one relevant"):
            metric(ranks)


@pytest.mark.parametrize(
    "scores, idx, match",
    [
        ([[0.1, 0.2]], [[2]], "lie in"),
        ([[0.1, 0.2]], [[-2]], "lie in"),
        ([[0.1, np.nan]], [[0]], "NaN"),
        ([[0.1, 0.2]], [[1, 1]], "repeats"),
        ([0.1, 0.2], [[1]], r"\[Q, C\]"),
        ([[0.1, 0.2]], [[1], [0]], r"\[Q, C\]"),
    ],
)
def test_ranks_of_rejects_bad_input(scores, idx, match):
    with pytest.raises(ValueError, match=match):
        ranks_of(np.array(scores), np.array(idx))


def test_ranks_of_rejects_float_indices():
    with pytest.raises(ValueError, match="integers"):
        ranks_of(np.zeros((1, 2)), np.array([[0.0]]))


def test_ndcg_hand_worked():
    ranks = _ranks([[0.9, 0.5, 0.7, 0.1], [0.9, 0.5, 0.7, 0.1]], [[0, 1], [2, -1]])  # ranks [1, 3] and [2]
    ideal_two = 1 + 1 / np.log2(3)
    np.testing.assert_allclose(ndcg_at_k(ranks, 10), [(1 + 1 / np.log2(4)) / ideal_two, 1 / np.log2(3)])
    np.testing.assert_allclose(ndcg_at_k(ranks, 2), [1 / ideal_two, 1 / np.log2(3)])  # rank 3 is cut off
    np.testing.assert_allclose(ndcg_at_k(ranks, 1), [1.0, 0.0])  # the ideal list at k=1 holds one item


def test_recall_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(np.array([[1]]), 0)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(np.array([[1]]), 0)


# --- properties against brute force ---------------------------------------------


def _brute_ap_sorted(scores_row, relevant_set):
    """Textbook AP: walk the list sorted by score, average precision at each hit."""
    order = np.argsort(-scores_row, kind="stable")
    hits, total = 0, 0.0
    for pos, c in enumerate(order, start=1):
        if c in relevant_set:
            hits += 1
            total += hits / pos
    return total / len(relevant_set)


def _brute_ap_thresholds(scores_row, relevant_set):
    """sklearn's average_precision_score: Σ over thresholds of Δrecall × precision."""
    rel = np.array([c in relevant_set for c in range(len(scores_row))])
    total, prev_recall = 0.0, 0.0
    for t in sorted(set(scores_row.tolist()), reverse=True):
        above = scores_row >= t
        recall = rel[above].sum() / rel.sum()
        total += (recall - prev_recall) * rel[above].sum() / above.sum()
        prev_recall = recall
    return total


@st.composite
def _problems(draw, unique):
    q = draw(st.integers(1, 4))
    c = draw(st.integers(1, 12))
    r = draw(st.integers(1, c))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if unique:
        scores = np.stack([rng.permutation(c) for _ in range(q)]).astype(float) / c
    else:
        scores = rng.integers(0, 3, size=(q, c)).astype(float)
    idx = np.full((q, r), -1, dtype=np.int64)
    for i in range(q):
        n = rng.integers(1, r + 1)
        idx[i, rng.choice(r, n, replace=False)] = rng.choice(c, n, replace=False)
    return scores, idx


def _rel_sets(idx):
    return [{int(c) for c in row if c >= 0} for row in idx]


@settings(max_examples=200, deadline=None)
@given(_problems(unique=True))
def test_ap_matches_sorted_brute_force_without_ties(problem):
    scores, idx = problem
    ap = average_precision(ranks_of(scores, idx))
    expected = [_brute_ap_sorted(s, rel) for s, rel in zip(scores, _rel_sets(idx))]
    np.testing.assert_allclose(ap, expected)


@settings(max_examples=200, deadline=None)
@given(_problems(unique=False))
def test_ap_matches_threshold_definition_with_ties(problem):
    scores, idx = problem
    ap = average_precision(ranks_of(scores, idx))
    expected = [_brute_ap_thresholds(s, rel) for s, rel in zip(scores, _rel_sets(idx))]
    np.testing.assert_allclose(ap, expected)


@settings(max_examples=200, deadline=None)
@given(st.one_of(_problems(unique=True), _problems(unique=False)))
def test_ranks_and_recall_match_brute_force(problem):
    scores, idx = problem
    ranks = ranks_of(scores, idx)
    for q, row in enumerate(idx):
        for j, c in enumerate(row):
            want = 0 if c < 0 else int((scores[q] >= scores[q, c]).sum())
            assert ranks[q, j] == want
    for k in (1, 3, 5):
        expected = [sum(int((s >= s[c]).sum()) <= k for c in rel) / len(rel) for s, rel in zip(scores, _rel_sets(idx))]
        np.testing.assert_allclose(recall_at_k(ranks, k), expected)


@settings(max_examples=200, deadline=None)
@given(st.one_of(_problems(unique=True), _problems(unique=False)))
def test_ap_is_one_iff_all_relevant_on_top(problem):
    scores, idx = problem
    ap = average_precision(ranks_of(scores, idx))
    for q, rel in enumerate(_rel_sets(idx)):
        others = [c for c in range(scores.shape[1]) if c not in rel]
        on_top = not others or min(scores[q, list(rel)]) > max(scores[q, others])
        assert (ap[q] == pytest.approx(1.0)) == on_top
        assert 0.0 < ap[q] <= 1.0 + 1e-12


def _brute_ndcg_sorted(scores_row, relevant_set, k):
    """Textbook nDCG@k: walk the top k of the sorted list, discount each hit by log2(position + 1)."""
    order = np.argsort(-scores_row, kind="stable")[:k]
    dcg = sum(1 / np.log2(pos + 1) for pos, c in enumerate(order, start=1) if c in relevant_set)
    return dcg / sum(1 / np.log2(pos + 1) for pos in range(1, min(len(relevant_set), k) + 1))


@settings(max_examples=200, deadline=None)
@given(_problems(unique=True), st.sampled_from([1, 3, 10]))
def test_ndcg_matches_sorted_brute_force_without_ties(problem, k):
    scores, idx = problem
    ndcg = ndcg_at_k(ranks_of(scores, idx), k)
    expected = [_brute_ndcg_sorted(s, rel, k) for s, rel in zip(scores, _rel_sets(idx))]
    np.testing.assert_allclose(ndcg, expected)
