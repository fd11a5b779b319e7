"""Evaluation: benchmark layouts, exact ranking, mAP with the Oxford AP interpolation."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from .functional import alpha_query_expansion, average_precision


@dataclass
class RetrievalBenchmark:
    """A database of images, the queries among them, and each query's positives and junk.

    ``queries[q]`` is a database index: that query is removed from its own ranking (Holidays and
    mvbench protocol). ``positives[q]``/``junk[q]`` are sets of database indices.
    """

    name: str
    root: Path
    paths: list[str]  # database images, absolute
    queries: list[int]
    positives: list[set[int]]
    junk: list[set[int]] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # each query's group name, for the reports

    def __post_init__(self):
        if not self.junk:
            self.junk = [set() for _ in self.queries]


def load_groups_dataset(root) -> RetrievalBenchmark:
    """The mvbench layout: ``images/`` + ``groups.json`` (+ ``distractors/`` + ``distractors.json``).

    Every group image is a query in turn; positives are the other images of its group.
    """
    root = Path(root)
    groups_file = root / "groups.json"
    if not groups_file.is_file():
        raise FileNotFoundError(f"{groups_file}: missing (a groups dataset needs images/ and groups.json)")
    groups = json.loads(groups_file.read_text())
    paths, group_of = [], []
    for g, files in groups.items():
        for f in files:
            paths.append(str(root / "images" / f))
            group_of.append(g)
    distractors_file = root / "distractors.json"
    if distractors_file.is_file():
        paths += [str(root / "distractors" / f) for f in json.loads(distractors_file.read_text())]
    members: dict[str, set[int]] = {}
    for i, g in enumerate(group_of):
        members.setdefault(g, set()).add(i)
    queries = list(range(len(group_of)))
    positives = [members[group_of[q]] - {q} for q in queries]
    return RetrievalBenchmark(name=root.name, root=root, paths=paths, queries=queries,
                              positives=positives, groups=group_of)


def rank_database(X_db: np.ndarray, X_q: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 ranking of the database for each query row: (distances, indices), (nq, k)."""
    X_db = np.ascontiguousarray(X_db, dtype=np.float32)
    index = faiss.IndexFlatL2(X_db.shape[1])
    index.add(X_db)
    return index.search(np.ascontiguousarray(X_q, dtype=np.float32), k or len(X_db))


def query_aps(bench: RetrievalBenchmark, ranking: np.ndarray) -> np.ndarray:
    """AP of every query, given ``ranking`` (nq, n_db) of database indices, best first."""
    aps = np.empty(len(bench.queries))
    for qi, q in enumerate(bench.queries):
        skip = bench.junk[qi] | {q}
        kept = [r for r in ranking[qi] if r not in skip and r >= 0]
        pos = bench.positives[qi]
        ranks = np.array([i for i, r in enumerate(kept) if r in pos])
        aps[qi] = average_precision(ranks, len(pos))
    return aps


@dataclass
class EvalResult:
    mAP: float
    aps: np.ndarray
    extra: dict = field(default_factory=dict)


def evaluate_descriptors(bench: RetrievalBenchmark, X: np.ndarray, qe: int = 0, alpha: float = 3.0) -> EvalResult:
    """mAP of descriptors ``X`` (one row per database image, aligned with ``bench.paths``).

    ``qe`` > 0: α-query expansion with that many top neighbours (the query itself and its junk
    images excluded), then a second ranking.
    """
    Q = X[bench.queries]
    _, ranking = rank_database(X, Q)
    if qe > 0:
        tops = []
        for qi, q in enumerate(bench.queries):
            skip = bench.junk[qi] | {q}
            tops.append([r for r in ranking[qi][: qe + len(skip) + 1] if r not in skip][:qe])
        Q = alpha_query_expansion(Q, X[np.array(tops)], alpha)
        _, ranking = rank_database(X, Q)
    aps = query_aps(bench, ranking)
    valid = ~np.isnan(aps)
    result = EvalResult(mAP=float(aps[valid].mean()), aps=aps)
    if bench.groups:
        sizes = {g: bench.groups.count(g) for g in set(bench.groups)}
        big = np.array([sizes[g] >= 3 for g in bench.groups]) & valid
        if big.any():
            result.extra["mAP_groups_ge3"] = float(aps[big].mean())
    return result
