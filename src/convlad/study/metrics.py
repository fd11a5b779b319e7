"""Retrieval metrics with the benchmarks' official conventions: Oxford AP (trapezoid rule, junk
skipped), the revisited protocol's mP@k, UKBench's N-S score."""
from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np


def average_precision(ranks_of_positives: np.ndarray, n_positives: int) -> float:
    """AP with the interpolation of the official Oxford ``compute_ap``.

    ``ranks_of_positives``: 0-based positions of the positives in the ranking *after junk images are
    removed from it* (junk consumes no rank). Precision at recall 0 is taken as 1 and the curve is
    integrated with the trapezoid rule between successive recall points. A query without positives
    has no defined AP: NaN, for the caller to exclude.
    """
    if n_positives == 0:
        return float("nan")
    ranks = np.sort(np.asarray(ranks_of_positives, dtype=np.float64))
    i = np.arange(len(ranks), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(ranks > 0, i / np.maximum(ranks, 1), 1.0)
    p1 = (i + 1) / (ranks + 1)
    return float(np.sum((p0 + p1) / 2) / n_positives)


def positive_ranks(ranking: Sequence, positives: Collection, junk: Collection = ()) -> np.ndarray:
    """0-based positions of ``positives`` in ``ranking`` once the ``junk`` entries are skipped."""
    ranking = np.asarray(ranking)
    keep = ~np.isin(ranking, np.fromiter(junk, dtype=ranking.dtype, count=len(junk))) if len(junk) else \
        np.ones(len(ranking), bool)
    kept = ranking[keep]
    return np.flatnonzero(np.isin(kept, np.fromiter(positives, dtype=ranking.dtype, count=len(positives))))


def ap_of_ranking(ranking, positives, junk=()) -> float:
    """AP of one ranked list of ids, given its positive and junk ids (junk skipped, consuming no rank)."""
    positives, junk = set(positives), set(junk)
    kept = [r for r in ranking if r not in junk]
    ranks = [i for i, r in enumerate(kept) if r in positives]
    return average_precision(np.array(ranks), len(positives))


def precision_at_k(ranks_of_positives: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Precision at each k as the revisited Oxford/Paris ``compute_map`` defines it: with junk
    skipped, positives within the first min(k, rank of the last positive) over that number, so a
    query with fewer than k positives, all on top, still scores 1. NaN without positives found."""
    pos = np.sort(np.asarray(ranks_of_positives)) + 1  # 1-based
    if len(pos) == 0:
        return np.full(len(ks), np.nan)
    out = np.empty(len(ks))
    for j, k in enumerate(ks):
        kq = min(int(pos.max()), int(k))
        out[j] = (pos <= kq).sum() / kq
    return out


def ns_score(ranking: Sequence, relevant: Collection, n: int = 4) -> int:
    """UKBench's N-S score of one query: how many of the ``n`` first results (the query itself
    included, as in Nistér & Stewénius 2006) are ``relevant``; 4 is perfect."""
    return int(np.isin(np.asarray(ranking)[:n], list(relevant)).sum())


def grouping_scores(found, truth) -> dict[str, float]:
    """How a grouping of items (``found``: a label per item) agrees with the true one (``truth``:
    a label per item; a distractor is a group of its own): pairwise precision, recall and F1 over
    the pairs of items put together, and B-cubed precision, recall and F1 (Bagga & Baldwin 1998:
    per item, the share of its found group that is truly its own, and of its true group found
    with it, averaged over items). Labels are any hashable values, compared within each list."""
    f, f_inv = np.unique(np.asarray(found, dtype=object).astype(str), return_inverse=True)
    t, t_inv = np.unique(np.asarray(truth, dtype=object).astype(str), return_inverse=True)
    if len(f_inv) != len(t_inv):
        raise ValueError(f"{len(f_inv)} found labels for {len(t_inv)} true ones")
    both = np.zeros((len(f), len(t)), np.int64)  # items in each (found, true) pair of groups
    np.add.at(both, (f_inv, t_inv), 1)
    fs, ts = both.sum(1), both.sum(0)

    def pairs(n):
        return (n * (n - 1) // 2).sum()

    together, found_pairs, true_pairs = pairs(both), pairs(fs), pairs(ts)
    p = together / found_pairs if found_pairs else 1.0
    r = together / true_pairs if true_pairs else 1.0
    # B-cubed: each item weighs its cell's size over its found and its true group's sizes
    cell = both[f_inv, t_inv].astype(np.float64)
    bp, br = float(np.mean(cell / fs[f_inv])), float(np.mean(cell / ts[t_inv]))
    return {"pairwise_precision": float(p), "pairwise_recall": float(r),
            "pairwise_f1": float(2 * p * r / (p + r)) if p + r else 0.0,
            "bcubed_precision": bp, "bcubed_recall": br, "bcubed_f1": 2 * bp * br / (bp + br) if bp + br else 0.0}


def bootstrap_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 10_000, level: float = 0.95,
                         seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``b − a`` over queries (per-query APs of two methods on the same queries, NaNs
    dropped pairwise) and its percentile bootstrap interval: queries are resampled with
    replacement, the paired difference keeps their correlation. Returns (mean, low, high)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"per-query values differ in length ({len(a)} and {len(b)}): not the same queries")
    d = (b - a)[~(np.isnan(a) | np.isnan(b))]
    if len(d) == 0:
        raise ValueError("no query with a value in both")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(d.mean()), float(low), float(high)
