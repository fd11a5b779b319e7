"""Evaluation: exact ranking of a benchmark's database for its queries, and the benchmark's metrics."""
from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np

from .datasets import RetrievalBenchmark
from .functional import alpha_query_expansion
from .metrics import average_precision, ns_score, positive_ranks, precision_at_k
from .verify import LocalCodes, Verifier

PRECISION_KS = (1, 5, 10)


def rank_database(X_db: np.ndarray, X_q: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 ranking of the database for each query row: (distances, indices), (nq, k)."""
    X_db = np.ascontiguousarray(X_db, dtype=np.float32)
    index = faiss.IndexFlatL2(X_db.shape[1])
    index.add(X_db)
    return index.search(np.ascontiguousarray(X_q, dtype=np.float32), k or len(X_db))


def query_aps(bench: RetrievalBenchmark, ranking: np.ndarray, positives=None, junk=None) -> np.ndarray:
    """AP of every query, given ``ranking`` (nq, n_db) of database indices, best first; junk skipped."""
    positives = bench.positives if positives is None else positives
    junk = bench.junk if junk is None else junk
    return np.array([average_precision(positive_ranks(ranking[q], positives[q], junk[q]), len(positives[q]))
                     for q in range(len(positives))])


@dataclass
class EvalResult:
    mAP: float
    aps: np.ndarray
    extra: dict = field(default_factory=dict)  # further metrics by name (revisited E/M/H, mP@k, N-S, ...)
    aps_without_rerank: np.ndarray | None = None  # per query, when re-ranked: the same ranking before it

    @property
    def metrics(self) -> dict[str, float]:
        return {"mAP": self.mAP, **self.extra}


def evaluate_ranking(bench: RetrievalBenchmark, ranking: np.ndarray) -> EvalResult:
    """The benchmark's metrics for a full ranking (nq, n_db)."""
    aps = query_aps(bench, ranking)
    valid = ~np.isnan(aps)
    result = EvalResult(mAP=float(aps[valid].mean()) if valid.any() else float("nan"), aps=aps)
    for name, (pos, junk) in bench.protocols.items():
        ranks = [positive_ranks(ranking[q], pos[q], junk[q]) for q in range(len(pos))]  # once, for AP and P@k
        result.extra[f"mAP_{name}"] = float(np.nanmean([average_precision(r, len(p)) for r, p in zip(ranks, pos)]))
        prs = np.array([precision_at_k(r, PRECISION_KS) for r in ranks])
        for j, k in enumerate(PRECISION_KS):
            result.extra[f"mP@{k}_{name}"] = float(np.nanmean(prs[:, j]))
    if bench.kind == "ukbench":
        result.extra["N-S"] = float(np.mean([ns_score(ranking[q], bench.positives[q] | {bench.query_db[q]})
                                             for q in range(bench.n_queries)]))
    if bench.kind == "groups" and bench.groups:
        sizes = {g: bench.groups.count(g) for g in set(bench.groups)}
        big = np.array([sizes[g] >= 3 for g in bench.groups]) & valid
        if big.any() and not big.all():
            result.extra["mAP_groups_ge3"] = float(aps[big].mean())
    return result


def query_descriptors(bench: RetrievalBenchmark, X_db: np.ndarray, X_extra: np.ndarray | None = None) -> np.ndarray:
    """(nq, D): the database row for queries that are database images, else the rows of ``X_extra``
    (one per query with ``query_db`` None, in query order)."""
    out = np.empty((bench.n_queries, X_db.shape[1]), np.float32)
    j = 0
    for q, d in enumerate(bench.query_db):
        if d is not None:
            out[q] = X_db[d]
        else:
            out[q] = X_extra[j]
            j += 1
    return out


def extra_query_items(bench: RetrievalBenchmark) -> list:
    """What must be extracted for the queries beyond the database: cropped or outside queries."""
    return [item for item, d in zip(bench.query_items, bench.query_db) if d is None]


def evaluate_descriptors(bench: RetrievalBenchmark, X: np.ndarray, X_q: np.ndarray | None = None,
                         qe: int = 0, alpha: float = 3.0, rerank: int = 0, local: LocalCodes | None = None,
                         local_q: LocalCodes | None = None, verifier: Verifier | None = None) -> EvalResult:
    """Metrics of descriptors ``X`` (one row per database image, aligned with ``bench.paths``).

    ``X_q``: descriptors of the queries that are not database images (``extra_query_items``).
    ``qe`` > 0: α-query expansion with that many top neighbours (junk excluded, so never the query
    itself), then a second ranking.
    ``rerank`` > 0: spatial verification of each query's top ``rerank`` (``verifier``, the model's
    ``ConvVLAD.verifier()``; without one, Lite0's chance level) with the database's ``local`` codes
    and, for queries that are not database images, ``local_q``.
    """
    Q = query_descriptors(bench, X, X_q)
    D, ranking = rank_database(X, Q)
    if qe > 0:
        tops = []
        for q in range(bench.n_queries):
            skip = bench.junk[q]
            tops.append([r for r in ranking[q][: qe + len(skip) + 1] if r not in skip][:qe])
        Q = alpha_query_expansion(Q, X[np.array(tops)], alpha)
        D, ranking = rank_database(X, Q)
    if rerank > 0:
        if local is None:
            raise ValueError("re-ranking needs the database's local codes (model.transform(..., local=k))")
        verifier = verifier or Verifier()
        before = query_aps(bench, ranking)
        j = 0
        for q, d in enumerate(bench.query_db):
            if d is None:
                query, j = local_q.features(j), j + 1
            else:
                query = local.features(d)
            n = min(rerank + len(bench.junk[q]), ranking.shape[1])  # the query's own row is junk
            top = ranking[q, :n]
            ranking[q, :n], _ = verifier.rerank(query, top, D[q, :n], local[top])
        result = evaluate_ranking(bench, ranking)
        result.extra["mAP_without_rerank"] = float(np.nanmean(before))
        result.aps_without_rerank = before
        return result
    return evaluate_ranking(bench, ranking)
