"""Retrieval metrics for the LAReQA protocol: mAP, Recall@k, nDCG@k and rank distance.

Everything works on a `ranks` array [Q, R]: row q holds the 1-based ranks of
query q's relevant candidates, padded with 0 (rows may have 1..R relevant).
Computing ranks once per block of scores keeps the [Q, C] score matrix out of
the metrics, so huge candidate pools are scored block by block.

Ties count against the relevant item: its rank is the number of candidates
whose score is >= its own (itself included), i.e. it is placed after every
candidate it ties with. A relevant item tied with a non-relevant one gets the
worse rank, and constant scores cannot look like a perfect ranking.
"""

from __future__ import annotations

import numpy as np


def ranks_of(scores: np.ndarray, relevant_idx: np.ndarray) -> np.ndarray:
    """Tie-pessimistic 1-based ranks [Q, R] of `relevant_idx` [Q, R] (-1 = padding -> 0).

    rank[q, j] = |{c : scores[q, c] >= scores[q, relevant_idx[q, j]]}|; one
    [Q, C] comparison per relevant column, so memory stays O(Q * C).
    """
    scores = np.asarray(scores)
    idx = np.asarray(relevant_idx)
    if scores.ndim != 2 or idx.ndim != 2 or idx.shape[0] != scores.shape[0]:
        raise ValueError(f"want scores [Q, C] and relevant_idx [Q, R], got {scores.shape} and {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"relevant_idx must be integers, got {idx.dtype}")
    if np.any((idx < -1) | (idx >= scores.shape[1])):
        raise ValueError(f"relevant_idx must lie in [-1, {scores.shape[1]})")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    sorted_idx = np.sort(idx, axis=1)
    if np.any((sorted_idx[:, 1:] == sorted_idx[:, :-1]) & (sorted_idx[:, 1:] >= 0)):
        raise ValueError("a row of relevant_idx repeats a candidate")

    rows = np.arange(scores.shape[0])
    ranks = np.zeros(idx.shape, dtype=np.int64)
    for j in range(idx.shape[1]):  # loop over the few relevant columns, never candidates
        rel_score = scores[rows, np.maximum(idx[:, j], 0)]
        ranks[:, j] = np.where(idx[:, j] >= 0, (scores >= rel_score[:, None]).sum(axis=1), 0)
    return ranks


def _n_relevant(ranks: np.ndarray) -> np.ndarray:
    """Relevant count per query; a query without any has no defined metric."""
    if ranks.ndim != 2 or np.any(ranks < 0):
        raise ValueError("ranks must be [Q, R] with ranks >= 1 and 0 for padding")
    n = (ranks > 0).sum(axis=1)
    if np.any(n == 0):
        raise ValueError("every query needs at least one relevant candidate")
    return n


def average_precision(ranks: np.ndarray) -> np.ndarray:
    """AP per query: mean over relevant i of precision@r_i = |{j : r_j <= r_i}| / r_i.

    Without ties this is (1/R) Σ_k k / r_(k). With the tie-pessimistic ranks
    it equals sklearn's average_precision_score even with ties: items tied at
    a threshold share precision (relevant >= t) / (all >= t).
    """
    ranks = np.asarray(ranks)
    n = _n_relevant(ranks)
    valid = ranks > 0
    hits_up_to = ((ranks[:, None, :] <= ranks[:, :, None]) & valid[:, None, :]).sum(axis=2)
    precision = np.where(valid, hits_up_to / np.maximum(ranks, 1), 0.0)
    return precision.sum(axis=1) / n


def mean_average_precision(ranks: np.ndarray) -> float:
    """mAP: the mean of per-query AP."""
    return float(average_precision(ranks).mean())


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def recall_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Recall@k per query: |relevant ∩ top-k| / R (the hit rate when R = 1)."""
    _check_k(k)
    ranks = np.asarray(ranks)
    n = _n_relevant(ranks)
    return ((ranks > 0) & (ranks <= k)).sum(axis=1) / n


def ndcg_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """nDCG@k per query with binary relevance: Σ_{r_i <= k} 1/log2(r_i + 1) over the
    best possible, Σ_{i <= min(R, k)} 1/log2(i + 1) (MTEB's main retrieval score)."""
    _check_k(k)
    ranks = np.asarray(ranks)
    n = _n_relevant(ranks)
    gains = np.where((ranks > 0) & (ranks <= k), 1.0 / np.log2(np.maximum(ranks, 1) + 1.0), 0.0)
    ideal = np.cumsum(1.0 / np.log2(np.arange(1, k + 1) + 1.0))[np.minimum(n, k) - 1]
    return gains.sum(axis=1) / ideal


def rank_distance(ranks: np.ndarray) -> np.ndarray:
    """Rank distance per query: max - min rank of its relevant items (0 when R = 1).

    Measures how far apart the answers in different languages land, the
    language bias LAReQA targets.
    """
    ranks = np.asarray(ranks)
    _n_relevant(ranks)
    valid = ranks > 0
    hi = np.where(valid, ranks, np.iinfo(np.int64).min).max(axis=1)
    lo = np.where(valid, ranks, np.iinfo(np.int64).max).min(axis=1)
    return hi - lo
